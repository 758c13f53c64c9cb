"""A real LLaMA-Adapter V1 run on this CPU: SmolLM2-135M on the Alpaca 1k sample.

Records the loss curve, the held-out response NLL before and after (records of
alpaca_small_2k.json whose instruction is not in the 1k file), and a few generations
before and after, into bench/results/v1_alpaca_run.{json,md,png}.

    python bench/v1_alpaca_run.py --steps 300

`--name` writes bench/results/<name>.* instead, and trailing `section.key=value` arguments
override the recipe (for controls such as a longer run at another max_len); with
`train.resume=true` an interrupted run continues, and its time covers only the resumed part.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.data.templates import alpaca_prompt  # noqa: E402
from llama_adapter.eval.nll import held_out_alpaca, response_nll  # noqa: E402
from llama_adapter.recipe import load_recipe  # noqa: E402
from llama_adapter.runner import run_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/bench-v1-alpaca")
    ap.add_argument("--eval-records", type=int, default=200)
    ap.add_argument("--name", default="v1_alpaca_run")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(bench_threads())

    recipe = load_recipe(ROOT / "recipes" / "v1_smollm2_alpaca_cpu.yaml",
                         [f"data.train={DATA / 'alpaca_data_1k.json'}", f"train.max_steps={args.steps}",
                          f"train.out_dir={args.out}", "train.resume=false",
                          f"train.threads={bench_threads()}", *args.overrides])
    if not recipe.train.resume:  # `train.resume=true` continues an interrupted run from its last checkpoint
        shutil.rmtree(args.out, ignore_errors=True)
    held = held_out_alpaca(DATA / "alpaca_data_1k.json", DATA / "alpaca_small_2k.json", args.eval_records)
    demo = held[:5]
    prompts = [alpaca_prompt(r.instruction, r.input) for r in demo]

    base, tok = la.load_pretrained(recipe.model)
    nll_before = response_nll(base, tok, held)
    before = la.generate(base, tok, prompts, max_new_tokens=64)
    del base

    t0 = time.perf_counter()
    result, model, tok = run_recipe(recipe)
    train_seconds = time.perf_counter() - t0
    model.float()
    nll_after = response_nll(model, tok, held)
    after = la.generate(model, tok, prompts, max_new_tokens=64)

    shutil.copy(Path(args.out) / "loss.png", ROOT / "bench" / "results" / f"{args.name}.png")
    log = [json.loads(x) for x in (Path(args.out) / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    figures = {
        "steps": result.steps, "resumed_from_step": result.start_step,
        "trainable_parameters": la.count_trainable(model),
        "train_seconds": round(train_seconds, 1), "tokens_per_second": round(result.tokens_per_second, 1),
        "train_loss_first_20_mean": sum(losses[:20]) / 20, "train_loss_last_20_mean": sum(losses[-20:]) / 20,
        "val_loss_curve": [(r["step"], r["val_loss"]) for r in log if "val_loss" in r],
        "held_out_records": len(held), "held_out_response_nll_before": nll_before,
        "held_out_response_nll_after": nll_after,
        "generations": [{"instruction": r.instruction, "input": r.input, "before": b, "after": a}
                        for r, b, a in zip(demo, before, after)],
        "recipe": recipe.to_dict(),
    }
    rows = ["| measure | value |", "|---|---|",
            f"| steps (batch {recipe.train.batch_size} x <={recipe.data[0].max_len} tokens) | {result.steps}"
            + (f" (resumed at {result.start_step}; the time covers the resumed part)" if result.start_step else "")
            + " |",
            f"| trainable parameters | {figures['trainable_parameters']:,} |",
            f"| training time on this CPU | {train_seconds / 60:.1f} min ({result.tokens_per_second:.0f} tokens/s) |",
            f"| train loss, first 20 / last 20 steps | {figures['train_loss_first_20_mean']:.3f} / "
            f"{figures['train_loss_last_20_mean']:.3f} |",
            f"| held-out response NLL ({len(held)} records), before / after | {nll_before:.3f} / {nll_after:.3f} |"]
    gens = ["", "| instruction | before (base) | after (V1) |", "|---|---|---|"]
    for g in figures["generations"]:
        cells = [g["instruction"] + (f" ({g['input']})" if g["input"] else ""), g["before"], g["after"]]
        gens.append("| " + " | ".join(c.replace("\n", " ").replace("|", "/")[:160] for c in cells) + " |")
    table = "\n".join(rows + gens) + f"\n\n![loss curve]({args.name}.png)\n"
    write_results(args.name, figures, table, machine_info())
    print(table)


if __name__ == "__main__":
    main()
