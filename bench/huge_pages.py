"""Batch-1 greedy decoding with the frozen weights on huge pages (the loader's default on Linux) against without.

Run: python bench/huge_pages.py [--new-tokens 64] [--reps 5] [--threads 2]

The embedded SmolLM2-135M is loaded twice per base (bf16, int8, int4): once as the loader leaves it by default
(weights copied into a mapping advised for 2 MiB pages, model/hugepages.py) and once with
LLAMA_ADAPTER_HUGE_PAGES=0 (the allocator's 4 KiB pages). Each pair decodes exactly --new-tokens tokens on the
compiled step (`enable_compiled_decode`, what `la.generate` runs by default) and, for bf16, on the eager path too;
pairs and variants alternate on every repetition after a warm-up; medians. The greedy tokens of the two variants
must be equal. Writes bench/results/huge_pages.json and .md.
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
from llama_adapter.model.hugepages import ENV_SWITCH, huge_pages_available, mapping_fields  # noqa: E402

PROMPT = "The history of the Roman empire is"
CASES = (("bf16", None, "compiled"), ("bf16", None, "eager"), ("int8", "int8", "compiled"),
         ("int4", "int4", "compiled"))
VARIANTS = ("huge pages", "4 KiB pages")


def load(quantize: str | None, huge: bool) -> tuple[la.LlamaLM, Any]:
    os.environ[ENV_SWITCH] = "1" if huge else "0"
    try:
        return la.load_pretrained("smollm2-135m", dtype="bf16", quantize=quantize, progress=False)
    finally:
        os.environ.pop(ENV_SWITCH)


def huge_kb(tensor: torch.Tensor) -> int:
    """AnonHugePages (kB) of the mapping holding `tensor`."""
    return int(mapping_fields(tensor.data_ptr()).get("AnonHugePages", "0 kB").split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="huge_pages", help="results name under bench/results/")
    args = ap.parse_args()
    if not huge_pages_available():
        raise SystemExit("this machine offers no transparent huge pages on request (or the switch is off)")
    torch.set_num_threads(args.threads)
    n = args.new_tokens

    models: dict[tuple[str, str], tuple[la.LlamaLM, Any, list[int], Any]] = {}
    backing = {}
    for base, quantize, _ in CASES:
        for variant in VARIANTS:
            if (base, variant) in models:
                continue
            model, tok = load(quantize, variant == "huge pages")
            free = copy.copy(tok)
            free.eos_ids = {-1}  # never stop early: decode exactly n tokens
            models[(base, variant)] = (model, free, free.encode(PROMPT), enable_compiled_decode(model))
            backing[f"{base}/{variant}"] = huge_kb(model.layers[0].mlp.down_proj.weight
                                                   if quantize is None else next(model.layers[0].buffers()))

    outputs: dict[tuple, list[int]] = {}

    def run(base: str, path: str, variant: str) -> float:
        model, tok, ids, state = models[(base, variant)]
        disable_compiled_decode(model)
        if path == "compiled":
            model._compiled_decode = state
        t = time.perf_counter()
        out = list(generate_tokens(model, tok, [ids], Sampling(max_new_tokens=n)))
        elapsed = time.perf_counter() - t
        outputs[(base, path, variant)] = [int(o[0]) for o in out]
        return elapsed

    keys = [(base, path, variant) for base, _, path in CASES for variant in VARIANTS]
    for k in keys:  # warm-up; the compiled path's first call compiles (or loads from inductor's cache)
        run(*k)
        run(*k)
        print(f"warm-up {'/'.join(k)}", flush=True)
    same = {f"{b}/{p}": outputs[(b, p, VARIANTS[0])] == outputs[(b, p, VARIANTS[1])] for b, _, p in CASES}
    times: dict[tuple, list[float]] = {k: [] for k in keys}
    for rep in range(args.reps):
        for k in keys:
            times[k].append(run(*k))
        print(f"rep {rep + 1}: " + "  ".join(f"{'/'.join(k)} {n / times[k][-1]:.1f}" for k in keys), flush=True)

    tps = {"/".join(k): n / median(ts) for k, ts in times.items()}
    gain = {f"{b}/{p}": tps[f"{b}/{p}/{VARIANTS[0]}"] / tps[f"{b}/{p}/{VARIANTS[1]}"] for b, _, p in CASES}
    figures = {"benchmark": "batch-1 greedy decoding, weights on huge pages vs 4 KiB pages", "model": "smollm2-135m",
               "new_tokens": n, "reps": args.reps, "threads": args.threads, "tokens_per_s": tps,
               "huge_over_small": gain, "same_tokens": same, "anon_huge_kb_of_first_block_mapping": backing,
               "runs_s": {"/".join(k): ts for k, ts in times.items()}}
    machine = machine_info()
    lines = [f"# Batch-1 greedy decoding, SmolLM2-135M, weights on huge pages against 4 KiB pages, {n} tokens, "
             f"{args.threads} threads", "",
             f"Machine: {machine['cpu']}, {machine['usable_cpus']} CPUs; torch {machine['torch']}; {machine['date']}.",
             "", f"| base | path | huge pages tokens/s | 4 KiB pages tokens/s | ratio (medians of {args.reps}) "
                 "| same tokens |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for b, _, p in CASES:
        lines.append(f"| {b} | {p} | {tps[f'{b}/{p}/{VARIANTS[0]}']:.1f} | {tps[f'{b}/{p}/{VARIANTS[1]}']:.1f} "
                     f"| **{gain[f'{b}/{p}']:.3f}x** | {same[f'{b}/{p}']} |")
    lines += ["", "Kernel backing (AnonHugePages, kB, of the memory mapping holding the first block's weights; the "
              "kernel merges adjacent mappings, so a figure may cover more than one model): "
              + ", ".join(f"{k} {v}" for k, v in backing.items()) + "."]
    js, md = write_results(args.out, figures, "\n".join(lines), machine)
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
