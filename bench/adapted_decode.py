"""Batch-1 greedy decoding of adapted models against their base model, on the same (compiled and eager) path.

Run: python bench/adapted_decode.py [--new-tokens 96] [--reps 5] [--threads 2] [--dtype bf16]

Issue 38's target: with a V1 or LaVIN adapter attached, decoding is within 5% of the base model's tokens/s on
our same path. The embedded SmolLM2-135M is loaded once per variant (base, V1 with 10-token prompts on its
top 28 layers as recipes/v1_smollm2_alpaca_cpu.yaml, text-only LaVIN as recipes/lavin_smollm2_synth_cpu.yaml);
the adapters' zero-initialised parts are randomised so that they act, which does not change the work done.
Each variant decodes exactly --new-tokens tokens (end-of-sequence ignored), eager and with
`enable_compiled_decode`, alternating variants on every repetition after a warm-up that compiles.
Writes bench/results/adapted_decode.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import machine_info, median, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.generate import Sampling, generate_tokens  # noqa: E402
from llama_adapter.model.fastpath import disable_compiled_decode, enable_compiled_decode  # noqa: E402

PROMPT = "The history of the Roman empire is"
ADAPTERS: dict[str, Any] = {
    "base": None,
    "V1": la.AdapterV1Config(prompt_len=10, n_layers=28),
    "LaVIN (text)": la.LavinConfig(vision=None, rank=8),
}


def load_variant(cfg: Any, dtype: str) -> tuple[la.LlamaLM, Any]:
    model, tok = la.load_pretrained("smollm2-135m", dtype=dtype, progress=False)
    if cfg is not None:
        la.attach(model, cfg, tokenizer=tok)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in la.trainable_parameters(model).values():
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--out", default="adapted_decode", help="results name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens

    variants, states = {}, {}
    for name, cfg in ADAPTERS.items():
        model, tok = load_variant(cfg, args.dtype)
        free = copy.copy(tok)
        free.eos_ids = {-1}  # never stop early: decode exactly n tokens
        variants[name] = (model, free, free.encode(PROMPT))
        states[name] = enable_compiled_decode(model)

    def run(name: str, path: str) -> float:
        model, tok, ids = variants[name]
        disable_compiled_decode(model)
        if path == "compiled":
            model._compiled_decode = states[name]
        t = time.perf_counter()
        out = list(generate_tokens(model, tok, [ids], Sampling(max_new_tokens=n)))
        assert len(out) == n
        return time.perf_counter() - t

    keys = [(name, path) for name in variants for path in ("eager", "compiled")]
    compile_s = {}
    for name, path in keys:  # warm-up; the compiled path's first call compiles
        first = run(name, path)
        if path == "compiled":
            if states[name].failed or not states[name].compiled_steps:
                raise SystemExit(f"{name}: the compiled step did not run: {states[name].failed}")
            compile_s[name] = max(0.0, first - run(name, path))
        print(f"warm-up {name:14s} {path:8s} {first:6.1f} s", flush=True)

    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for rep in range(args.reps):
        for k in keys:  # alternate on every repetition
            times[k].append(run(*k))
        print(f"rep {rep + 1}: " + "  ".join(f"{k[0]}/{k[1]} {n / times[k][-1]:.1f}" for k in keys), flush=True)

    tps = {f"{name}/{path}": n / median(times[(name, path)]) for name, path in keys}
    ratios = {f"{name}/{path}": tps[f"{name}/{path}"] / tps[f"base/{path}"] for name, path in keys if name != "base"}
    figures = {"benchmark": "batch-1 greedy decoding, adapted vs base", "model": "smollm2-135m", "dtype": args.dtype,
               "new_tokens": n, "reps": args.reps, "threads": args.threads, "tokens_per_s": tps,
               "over_base_same_path": ratios, "compile_s": compile_s,
               "runs_s": {f"{a}/{b}": ts for (a, b), ts in times.items()}}
    machine = machine_info()
    lines = [f"# Batch-1 greedy decoding of adapted SmolLM2-135M against the base, {args.dtype}, {n} tokens, "
             f"{args.threads} threads", "",
             f"Machine: {machine['cpu']}, {machine['usable_cpus']} CPUs; torch {machine['torch']}; {machine['date']}.",
             "", f"| model | eager tokens/s | vs base | compiled tokens/s (median of {args.reps}) | vs base "
                 "| compile s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in variants:
        e, c = tps[f"{name}/eager"], tps[f"{name}/compiled"]
        re_, rc = ("-", "-") if name == "base" else (f"{ratios[f'{name}/eager']:.3f}x",
                                                      f"{ratios[f'{name}/compiled']:.3f}x")
        lines.append(f"| {name} | {e:.1f} | {re_} | {c:.1f} | {rc} | {compile_s[name]:.0f} |")
    js, md = write_results(args.out, figures, "\n".join(lines), machine)
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
