"""Speed of ranked-choice ScienceQA scoring: one prompt shared by its choices against one full sequence per
choice, the way likelihood-based evaluation usually runs (lm-evaluation-harness style).

Rows, on the same validation problems of the development protocol, in one process, alternating, medians:
- ours, shared prompt: `choice_logprobs` (the default): each prompt runs once; its keys/values are copied to
  one row per choice and the answers run as one more step of that cache;
- ours, one sequence per choice: `choice_logprobs(shared_prompt=False)`, the training layout;
- transformers, one sequence per choice: LlamaForCausalLM on the same sequences.
All fp32, zero-shot SmolLM2-135M, batches of 8 problems ordered by prompt length. The results also give how
far the three rows' scores are apart and whether they pick the same choices.

    python bench/ranked_scoring.py [--val-limit 150] [--reps 3] [--name ranked_scoring]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, scienceqa_validation, write_results  # noqa: E402
from compare_methods import TransformersModel  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.eval.scienceqa import choice_logprobs  # noqa: E402
from llama_adapter.model.load import resolve_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val-limit", type=int, default=150, help="validation problems, evenly spread (0: all)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="ranked_scoring")
    args = ap.parse_args()
    torch.set_num_threads(bench_threads())
    _, val = scienceqa_validation(args.val_limit)
    ours, tok = la.load_pretrained("smollm2-135m", dtype="fp32")
    hf = TransformersModel(str(resolve_model_path("smollm2-135m", progress=False)), ours.config)
    rows = {
        "ours, shared prompt": lambda: choice_logprobs(ours, tok, val, "plain"),
        "ours, one sequence per choice": lambda: choice_logprobs(ours, tok, val, "plain", shared_prompt=False),
        "transformers, one sequence per choice": lambda: choice_logprobs(hf, tok, val, "plain"),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    scores: dict[str, list[list[float]]] = {}
    choice_logprobs(ours, tok, val[:8], "plain")  # warm-up
    choice_logprobs(hf, tok, val[:8], "plain")
    for _ in range(args.reps):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                scores[name] = fn()
            times[name].append(time.perf_counter() - t0)
    ref = scores["transformers, one sequence per choice"]
    picks = {name: [max(range(len(s)), key=s.__getitem__) for s in sc] for name, sc in scores.items()}
    n_choices = sum(len(p.choices) for p in val)
    figures = {"val_problems": len(val), "choices": n_choices, "reps": args.reps}
    base = statistics.median(times["transformers, one sequence per choice"])
    for name in rows:
        med = statistics.median(times[name])
        figures[name] = {
            "seconds_median": round(med, 2), "seconds_all": [round(t, 2) for t in times[name]],
            "speedup_vs_transformers": round(base / med, 2),
            "max_abs_score_diff_vs_transformers": max(abs(a - b) for x, y in zip(scores[name], ref, strict=True)
                                                      for a, b in zip(x, y, strict=True)),
            "same_pick_as_transformers": sum(a == b for a, b in zip(picks[name], picks[
                "transformers, one sequence per choice"], strict=True)) / len(val),
            "accuracy": round(100 * sum(k == p.answer for k, p in zip(picks[name], val, strict=True)) / len(val), 1),
        }
    lines = [f"Ranked-choice scoring of {len(val)} dev-val ScienceQA problems ({n_choices} choices), zero-shot "
             f"SmolLM2-135M, fp32, batches of 8 problems, median of {args.reps}:", "",
             "| scorer | seconds | speed-up vs transformers | max score difference | same choice picked | accuracy |",
             "|---|---|---|---|---|---|"]
    for name in rows:
        f = figures[name]
        lines.append(f"| {name} | {f['seconds_median']} | {f['speedup_vs_transformers']}x | "
                     f"{f['max_abs_score_diff_vs_transformers']:.1e} | {100 * f['same_pick_as_transformers']:.1f}% | "
                     f"{f['accuracy']} |")
    md = "\n".join(lines)
    write_results(args.name, figures, md, machine_info(("transformers",)))
    print(md)


if __name__ == "__main__":
    main()
