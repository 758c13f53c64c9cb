"""Eager batch-1 decoding with q/k/v and gate/up fused (model/fused.py) against the same model
with one matmul per linear: SmolLM2-135M, greedy, fp32 and bf16, alternating, medians, and the
same for a folded V2 model (a bias on every linear) when --adapter is given.

    python bench/fused_projections.py [--reps 11] [--adapter runs/v2-synth-4k] [--name fused_projections]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402
from folded_decode import text_only_v2, tokens_per_second  # noqa: E402

import llama_adapter as la  # noqa: E402

generate_module = importlib.import_module("llama_adapter.generate")  # `la.generate` is the function


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapter", default=None, help="also measure this V2 adapter, folded")
    ap.add_argument("--name", default="fused_projections")
    args = ap.parse_args()
    torch.set_num_threads(2)
    fuse = generate_module.fuse_projections
    separate: set[int] = set()
    # generate_tokens fuses every model it decodes; the "separate" copies are kept out of that.
    generate_module.fuse_projections = lambda m: None if id(m) in separate else fuse(m)
    variants = [("fp32", "base"), ("bf16", "base")] + ([("bf16", "folded V2")] if args.adapter else [])
    results, lines = {}, ["| model | separate tokens/s | fused tokens/s | fused / separate |", "|---|---|---|---|"]
    for dtype, kind in variants:
        pair = {}
        for mode in ("separate", "fused"):
            if kind == "base":
                model, tok = la.load_pretrained("smollm2-135m", dtype=dtype)
            else:
                model, tok = text_only_v2(args.adapter)
            if mode == "separate":
                separate.add(id(model))
            pair[mode] = model
        tok.eos_ids = {-1}  # decode exactly --new-tokens tokens
        for m in pair.values():
            tokens_per_second(m, tok, 16)
        runs: dict[str, list[float]] = {k: [] for k in pair}
        for _ in range(args.reps):
            for mode, m in pair.items():
                runs[mode].append(tokens_per_second(m, tok, args.new_tokens))
        row = {k: statistics.median(v) for k, v in runs.items()}
        row["fused_over_separate"] = row["fused"] / row["separate"]
        row["all"] = runs
        results[f"{kind} {dtype}"] = row
        ratio = row["fused_over_separate"]
        lines.append(f"| {kind} {dtype} | {row['separate']:.1f} | {row['fused']:.1f} | {ratio:.3f} |")
    table = (f"Eager batch-1 greedy decoding, SmolLM2-135M, {args.new_tokens} new tokens, medians of {args.reps} "
             "alternating repetitions: one matmul per linear against q/k/v and gate/up fused.\n\n" + "\n".join(lines))
    write_results(args.name, {"adapter": args.adapter, **results}, table, machine_info())
    print(table)


if __name__ == "__main__":
    main()
