"""The reference point of the V1 ablation sweeps: the embedded model with no adapter, scored exactly as the sweeps
score each run (docs/ablations.md): the first 300 problems of the development protocol's validation side, ranked,
answers by the choice's text, plain template.

Run: python bench/ablation_zero_shot.py [--limit 300] [--threads 1]
Writes bench/results/ablation_zero_shot.json and .md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import machine_info, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.recipe import load_recipe  # noqa: E402
from llama_adapter.sweep import EvalSpec, evaluate_run  # noqa: E402

SCIENCEQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # the sweeps' own evaluation (EvalSpec + evaluate_run), with the template their recipe gives: plain
    spec = EvalSpec("scienceqa", problems=str(SCIENCEQA / "problems.json"), images=str(SCIENCEQA / "images"),
                    limit=args.limit, answer_form="choice")
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "v1_smollm2_alpaca_cpu.yaml",
                         ["data.format=llava", "data.template=plain"])
    model, tok = la.load_pretrained("smollm2-135m", progress=False)
    t = time.perf_counter()
    result = evaluate_run(model, tok, spec, recipe)
    seconds = time.perf_counter() - t
    figures = {"benchmark": "ScienceQA zero-shot, the V1 sweeps' evaluation", "model": "smollm2-135m",
               "accuracy": result["value"], "n": result["n"], "eval_seconds": seconds, "threads": args.threads}
    machine = machine_info()
    table = (f"# Zero-shot reference of the V1 ablation sweeps\n\nSmolLM2-135M with no adapter, the first "
             f"{result['n']} development-protocol validation problems, ranked, choice-text answers: "
             f"**{100 * result['value']:.1f}%** "
             f"({seconds:.0f} s on {args.threads} thread(s), {machine['cpu']}).")
    js, md = write_results("ablation_zero_shot", figures, table, machine)
    print(table)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
