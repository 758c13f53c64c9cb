"""Batch-1 greedy decoding of adapted models against their base model, on the same (compiled and eager) path.

Run: python bench/adapted_decode.py [--new-tokens 96] [--reps 5] [--threads 2] [--dtype bf16] [--paths compiled]

Issue 38's target: with a V1 or LaVIN adapter attached, decoding is within 5% of the base model's tokens/s on
our same path. The embedded SmolLM2-135M is loaded once per variant (base, V1 with 10-token prompts on its
top 28 layers as recipes/v1_smollm2_alpaca_cpu.yaml, text-only LaVIN as recipes/lavin_smollm2_synth_cpu.yaml);
the adapters' zero-initialised parts are randomised so that they act, which does not change the work done.
Each variant decodes exactly --new-tokens tokens (end-of-sequence ignored), eager and with
`enable_compiled_decode`, alternating variants on every repetition (their order rotated from one repetition to
the next) after a warm-up that compiles. Besides the ratio of medians, the median of each repetition's own ratio
(variant against the base in the same repetition, seconds apart): on a shared machine whose speed drifts by 20%
within minutes, the paired figure is the steadier one. And the decode step alone (after the second token, so
without the prefill and the first step, which builds the step's inputs): where adapters cost time, prefill or step.
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
    ap.add_argument("--paths", default="eager,compiled", help="comma-separated: eager, compiled")
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

    def run(name: str, path: str) -> tuple[float, float]:
        """Seconds for the whole generation, and per decode step after the second token."""
        model, tok, ids = variants[name]
        disable_compiled_decode(model)
        if path == "compiled":
            model._compiled_decode = states[name]
        t = time.perf_counter()
        stamps = [time.perf_counter() for _ in generate_tokens(model, tok, [ids], Sampling(max_new_tokens=n))]
        assert len(stamps) == n
        return stamps[-1] - t, (stamps[-1] - stamps[1]) / (n - 2)

    paths = args.paths.split(",")
    if not paths or not set(paths) <= {"eager", "compiled"}:
        raise SystemExit(f"--paths: eager and/or compiled, got {args.paths!r}")
    keys = [(name, path) for name in variants for path in paths]
    compile_s = {}
    for name, path in keys:  # warm-up; the compiled path's first call compiles
        first = run(name, path)[0]
        if path == "compiled":
            if states[name].failed or not states[name].compiled_steps:
                raise SystemExit(f"{name}: the compiled step did not run: {states[name].failed}")
            compile_s[name] = max(0.0, first - run(name, path)[0])
        print(f"warm-up {name:14s} {path:8s} {first:6.1f} s", flush=True)

    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    steps: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for rep in range(args.reps):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:  # alternate, in a rotating order
            total, step = run(*k)
            times[k].append(total)
            steps[k].append(step)
        print(f"rep {rep + 1}: " + "  ".join(f"{k[0]}/{k[1]} {n / times[k][-1]:.1f}" for k in keys), flush=True)

    tps = {f"{name}/{path}": n / median(times[(name, path)]) for name, path in keys}
    ratios = {f"{name}/{path}": tps[f"{name}/{path}"] / tps[f"base/{path}"] for name, path in keys if name != "base"}

    def paired_medians(series: dict[tuple[str, str], list[float]]) -> dict[str, float]:
        """Per variant: the median over repetitions of the base's seconds over the variant's, same repetition."""
        return {f"{name}/{path}": median([b / t for b, t in zip(series[("base", path)], series[(name, path)])])
                for name, path in keys if name != "base"}

    paired, step_paired = paired_medians(times), paired_medians(steps)
    step_ms = {f"{name}/{path}": 1e3 * median(steps[(name, path)]) for name, path in keys}
    figures = {"benchmark": "batch-1 greedy decoding, adapted vs base", "model": "smollm2-135m", "dtype": args.dtype,
               "new_tokens": n, "reps": args.reps, "threads": args.threads, "tokens_per_s": tps,
               "over_base_same_path": ratios, "over_base_paired_median": paired,
               "step_ms": step_ms, "step_over_base_paired_median": step_paired, "compile_s": compile_s,
               "runs_s": {f"{a}/{b}": ts for (a, b), ts in times.items()},
               "steps_s": {f"{a}/{b}": ts for (a, b), ts in steps.items()}}
    machine = machine_info()
    lines = [f"# Batch-1 greedy decoding of adapted SmolLM2-135M against the base, {args.dtype}, {n} tokens, "
             f"{args.threads} threads", "",
             f"Machine: {machine['cpu']}, {machine['usable_cpus']} CPUs; torch {machine['torch']}; {machine['date']}.",
             "", "| model | " + " | ".join(f"{p} tokens/s (median of {args.reps}) | vs base | paired vs base | "
                                             f"{p} step ms | step speed, paired vs base" for p in paths)
             + " | compile s |",
             "| --- |" + " ---: | ---: | ---: | ---: | ---: |" * len(paths) + " ---: |"]
    for name in variants:
        cells = []
        for path in paths:
            key = f"{name}/{path}"
            base_cells = ["-", "-", f"{step_ms[key]:.2f}", "-"]
            cells += [f"{tps[key]:.1f}"] + (base_cells if name == "base" else
                                             [f"{ratios[key]:.3f}x", f"{paired[key]:.3f}x", f"{step_ms[key]:.2f}",
                                              f"{step_paired[key]:.3f}x"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {compile_s.get(name, 0):.0f} |")
    js, md = write_results(args.out, figures, "\n".join(lines), machine)
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
