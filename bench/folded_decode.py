"""Decoding speed of a folded LLaMA-Adapter V2 model against the base model: after folding,
scales, biases and LoRA live in the weights, so the only extra work is the bias additions.
Batch 1, greedy, 64 new tokens, alternating base / folded, medians; eager and compiled.
On a shared machine single runs drift by +-10%, so besides the ratio of medians the results
give the median and quartiles of the per-pair ratios (each pair ran back to back); many short
pairs (61 of 64 tokens) pin that median down better than a few long ones (21 of 128 had
quartiles 6-9 points apart).

    python bench/folded_decode.py [--adapter runs/v2-synth-alpaca] [--reps 61] [--name folded_decode]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.generate import Sampling, generate_tokens  # noqa: E402

PROMPT = "Tell me a long story about a dragon who learns to read."


def text_only_v2(adapter: str | None):
    """The folded text path of a trained V2 adapter (its bias tuning and norms, no prompts), or a
    V2 adapter with random non-trivial scales and biases when none is given."""
    model, tok = la.load_pretrained("smollm2-135m", dtype="bf16")
    if adapter:
        la.load_adapter(model, adapter, tokenizer=tok)
    else:
        la.attach(model, la.AdapterV2Config(n_layers=0))
        with torch.no_grad():
            for p in la.trainable_parameters(model).values():
                p.add_(torch.randn_like(p) * 0.01)
    la.fold(model)
    # Measure the folded linears only (prompts cost what they cost in V1): drop prompts and the
    # visual modules, leaving a plain LLaMA with biases, as `llama-adapter export` writes it.
    for layer in model.layers:
        layer.self_attn.prefix = None
    model.adapter = None
    if hasattr(model, "visual"):
        del model.visual
    return model.to(torch.bfloat16), tok


def tokens_per_second(model, tok, n: int) -> float:
    ids = [tok.encode(PROMPT)]
    t0 = time.perf_counter()
    steps = sum(1 for _ in generate_tokens(model, tok, ids, Sampling(max_new_tokens=n)))
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--reps", type=int, default=61)
    ap.add_argument("--name", default="folded_decode", help="results file name (one per machine type)")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    base, tok = la.load_pretrained("smollm2-135m", dtype="bf16")
    tok.eos_ids = {-1}  # decode exactly --new-tokens tokens
    folded, _ = text_only_v2(args.adapter)
    results = {}
    for compiled in (False, True):
        for m in (base, folded):  # the eager rows without the default compiled step
            la.enable_compiled_decode(m) if compiled else la.disable_compiled_decode(m)
        models = {"base": base, "folded_v2": folded}
        for m in models.values():
            tokens_per_second(m, tok, args.new_tokens)  # warm-up (and compile)
        runs: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.reps):
            for name, m in models.items():
                runs[name].append(tokens_per_second(m, tok, args.new_tokens))
        mode = "compiled" if compiled else "eager"
        results[mode] = {k: statistics.median(v) for k, v in runs.items()}
        results[mode]["all"] = runs
        results[mode]["folded_over_base"] = results[mode]["folded_v2"] / results[mode]["base"]
        pairs = [f / b for f, b in zip(runs["folded_v2"], runs["base"])]
        results[mode]["paired_ratio_quartiles"] = statistics.quantiles(pairs, n=4)
    lines = ["| mode (bf16) | base tokens/s | folded V2 tokens/s | folded / base | paired ratios: median (quartiles) |",
             "|---|---|---|---|---|"]
    for mode, r in results.items():
        q1, q2, q3 = r["paired_ratio_quartiles"]
        lines.append(f"| {mode} | {r['base']:.1f} | {r['folded_v2']:.1f} | {r['folded_over_base']:.3f} "
                     f"| {q2:.3f} ({q1:.3f}-{q3:.3f}) |")
    table = ("Batch-1 greedy decoding, SmolLM2-135M, " f"{args.new_tokens} new tokens, medians of {args.reps}; "
             f"target: folded within 3% of the base.\n\n" + "\n".join(lines))
    write_results(args.name, {"adapter": args.adapter, **results}, table, machine_info())
    print(table)


if __name__ == "__main__":
    main()
