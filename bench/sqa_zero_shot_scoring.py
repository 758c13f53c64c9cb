"""How much does SmolLM2-135M know about the ScienceQA validation problems before any training?

The comparison (bench/compare_methods.py) scores a choice by the likelihood of "The answer is X." (X a letter),
which asks the model to map content to a letter. This probe scores the same validation problems, zero-shot,
in three ways: the letter (as the comparison does), the choice's own text ("The answer is <choice>.", summed
log-probability) and that text's mean per-token log-probability. It also reports what a constant guess of (A)
would score. When all of them sit near the constant guess, the model lacks the knowledge, not the format.

    python bench/sqa_zero_shot_scoring.py [--val-limit 300] [--name sqa_zero_shot_scoring]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, scienceqa_validation, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.eval.scienceqa import choice_logprobs  # noqa: E402


def text_scores(model, tok, problems) -> list[list[tuple[float, int]]]:
    """Per problem, per choice: (summed log p of "The answer is <choice>.", its token count)."""
    def texts(p):
        return [f"The answer is {c}." for c in p.choices]

    sums = choice_logprobs(model, tok, problems, "plain", answers=texts)
    return [[(s, len(tok.encode(t, add_special_tokens=False))) for s, t in zip(row, texts(p), strict=True)]
            for row, p in zip(sums, problems, strict=True)]


def accuracy(problems, picks) -> float:
    return round(100 * sum(k == p.answer for p, k in zip(problems, picks, strict=True)) / len(problems), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val-limit", type=int, default=300, help="validation problems, evenly spread (0: all)")
    ap.add_argument("--name", default="sqa_zero_shot_scoring")
    args = ap.parse_args()
    torch.set_num_threads(bench_threads())
    _, val = scienceqa_validation(args.val_limit)
    model, tok = la.load_pretrained("smollm2-135m")
    t0 = time.perf_counter()
    letters = choice_logprobs(model, tok, val, "plain")
    texts = text_scores(model, tok, val)
    argmax = lambda xs: max(range(len(xs)), key=xs.__getitem__)  # noqa: E731
    figures = {
        "val_problems": len(val),
        "constant_A": accuracy(val, [0] * len(val)),
        "letter": accuracy(val, [argmax(s) for s in letters]),
        "choice_text_sum": accuracy(val, [argmax([s for s, _ in t]) for t in texts]),
        "choice_text_mean": accuracy(val, [argmax([s / n for s, n in t]) for t in texts]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    md = "\n".join([
        f"Zero-shot SmolLM2-135M on {len(val)} dev-val problems (plain template), accuracy %:", "",
        "| always (A) | letter: \"The answer is X.\" | choice text, summed | choice text, per-token mean |",
        "|---|---|---|---|",
        f"| {figures['constant_A']} | {figures['letter']} | {figures['choice_text_sum']} | "
        f"{figures['choice_text_mean']} |"])
    write_results(args.name, figures, md, machine_info())
    print(md)


if __name__ == "__main__":
    main()
