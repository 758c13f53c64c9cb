"""The default decode path (no opt-in) against transformers, at batch 1, 8 and 32, and its first call.

Run: python bench/default_decode.py [--new-tokens 64] [--reps 5] [--batches 1 8 32] [--threads 2]
     python bench/default_decode.py --dtypes bf16 --batches 1 2 4 8 32 --with-compiled --skip-first-call \
         --reps 3 --out default_decode_batches    # where the compiled step pays off

Part 1, steady state, one process: `generate_tokens` as `la.generate` runs it by default (the compiled step, made
ready by a warm-up call and waiting for its background compile), the same with the fast path off (eager), and
transformers' `generate`, in fp32 and bf16, greedy, exactly --new-tokens tokens per row (end of sequence ignored),
alternating on every repetition after the warm-up; medians. Batch B decodes B copies of the prompt.
`--with-compiled` adds the compiled step forced on at every batch size (`enable_compiled_decode`), which shows
where the default uses it.

Part 2, the first call of a fresh process (`la.load_pretrained` then one `la.generate` of --new-tokens tokens,
batch 1, bf16): with inductor's on-disk cache empty (a new machine) and filled (any later process), default path
against LLAMA_ADAPTER_FAST_DECODE=0; the time of the first call and how many of its tokens ran on the graph.

Writes bench/results/default_decode.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import machine_info, median, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.generate import Sampling, generate_tokens  # noqa: E402
from llama_adapter.model.fastpath import CompiledDecode, default_decode, disable_compiled_decode  # noqa: E402
from llama_adapter.model.load import resolve_model_path  # noqa: E402

PROMPT = "The history of the Roman empire is"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MODEL = "smollm2-135m"

FIRST_CALL = """
import json, sys, time
t0 = time.perf_counter()
import llama_adapter as la
from llama_adapter.model.fastpath import compiled_decode_of
model, tok = la.load_pretrained({model!r}, dtype="bf16", progress=False)
t1 = time.perf_counter()
la.generate(model, tok, {prompt!r}, max_new_tokens={n})
t2 = time.perf_counter()
state = compiled_decode_of(model)
steps = state.compiled_steps if state else 0
if state:
    state.wait()
t3 = time.perf_counter()
print(json.dumps({{"load_s": t1 - t0, "first_call_s": t2 - t1, "compiled_steps": steps, "compile_left_s": t3 - t2}}))
"""


def ours_runner(model, tok, rows: int, n: int) -> Callable[[], list[list[int]]]:
    free = copy.copy(tok)
    free.eos_ids = {-1}  # never stop early: decode exactly n tokens per row
    ids = [tok.encode(PROMPT)] * rows

    def run() -> list[list[int]]:
        return [t.tolist() for t in generate_tokens(model, free, ids, Sampling(max_new_tokens=n))]
    return run


def hf_runner(model, tok, rows: int, n: int) -> Callable[[], list[list[int]]]:
    input_ids = torch.tensor([tok.encode(PROMPT)] * rows)
    mask = torch.ones_like(input_ids)

    def run() -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=tok.pad_id)
        return out[:, input_ids.shape[1]:].T.tolist()
    return run


def first_call(n: int, cache_dir: str, fast: bool, threads: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, LLAMA_ADAPTER_FAST_DECODE="1" if fast else "0",
               OMP_NUM_THREADS=str(threads))
    code = FIRST_CALL.format(model=MODEL, prompt=PROMPT, n=n)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-first-call", action="store_true")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--with-compiled", action="store_true", help="add the compiled step at every batch size")
    ap.add_argument("--out", default="default_decode")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens
    from transformers import AutoModelForCausalLM

    path = str(resolve_model_path(MODEL, progress=False))
    runners: dict[str, Callable[[], list[list[int]]]] = {}
    models = {}
    impls = ["ours-default", "ours-eager"] + (["ours-compiled"] if args.with_compiled else []) + ["transformers"]
    for dt_name in args.dtypes:
        model, tok = la.load_pretrained(MODEL, dtype=dt_name, progress=False)
        models[dt_name] = model
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPES[dt_name])).eval()
        for b in args.batches:
            for impl in impls:
                runners[f"{impl}/{dt_name}/{b}"] = (hf_runner(hf, tok, b, n) if impl == "transformers"
                                                    else ours_runner(model, tok, b, n))
    states = {dt: default_decode(m) for dt, m in models.items()}
    forced = {dt: CompiledDecode(m) for dt, m in models.items()}
    if any(s is None for s in states.values()):
        raise SystemExit("the default fast path is off here (LLAMA_ADAPTER_FAST_DECODE=0, or not a CPU)")

    def run(key: str) -> tuple[float, list[list[int]]]:
        impl, dt_name, _ = key.split("/")
        if impl.startswith("ours"):
            disable_compiled_decode(models[dt_name])
            if impl == "ours-default":
                models[dt_name]._compiled_decode = states[dt_name]
            elif impl == "ours-compiled":
                models[dt_name]._compiled_decode = forced[dt_name]
        t = time.perf_counter()
        out = runners[key]()
        return time.perf_counter() - t, out

    tokens: dict[str, list[list[int]]] = {}
    for key in runners:  # warm-up; the default path's graphs compile in the background, then are waited for
        tokens[key] = run(key)[1]
        if key.startswith("ours-default/"):
            state = states[key.split("/")[1]]
            state.wait()
            tokens[key] = run(key)[1]
            if state.failed or not state.compiled_steps:
                raise SystemExit(f"the compiled step did not run: {state.failed}")
        print(f"warm-up {key}", flush=True)

    times: dict[str, list[float]] = {k: [] for k in runners}
    for rep in range(args.reps):
        for key in runners:
            times[key].append(run(key)[0])
        print(f"rep {rep + 1}: " + "  ".join(f"{k} {int(k.split('/')[2]) * n / times[k][-1]:.1f}" for k in runners),
              flush=True)

    results = {k: {"impl": k.split("/")[0], "dtype": k.split("/")[1], "batch": int(k.split("/")[2]),
                   "median_s": median(ts), "runs_s": ts, "tokens_per_s": int(k.split("/")[2]) * n / median(ts)}
               for k, ts in times.items()}

    def best(impl: str, b: int) -> dict:
        return max((r for r in results.values() if r["impl"] == impl and r["batch"] == b),
                   key=lambda r: r["tokens_per_s"])

    table = {}
    for b in args.batches:
        d, e, h = best("ours-default", b), best("ours-eager", b), best("transformers", b)
        table[b] = {"default": d, "eager": e, "transformers": h,
                    "default_over_transformers": d["tokens_per_s"] / h["tokens_per_s"],
                    "default_over_eager": d["tokens_per_s"] / e["tokens_per_s"],
                    "default_over_default_batch1": d["tokens_per_s"] / best("ours-default", args.batches[0])
                    ["tokens_per_s"]}
    same = {dt: all(tokens[f"ours-default/{dt}/{b}"] == tokens[f"ours-eager/{dt}/{b}"] for b in args.batches)
            for dt in models}

    firsts = {}
    if not args.skip_first_call:
        with tempfile.TemporaryDirectory() as cold:
            firsts["empty cache, eager"] = first_call(n, cold, False, args.threads)
            firsts["empty cache, default"] = first_call(n, cold, True, args.threads)
            firsts["filled cache, default"] = first_call(n, cold, True, args.threads)
            firsts["filled cache, eager"] = first_call(n, cold, False, args.threads)
        for k, v in firsts.items():
            print(k, v, flush=True)

    machine = machine_info(("transformers",))
    lines = [f"# The default decode path, {MODEL}, greedy, {n} new tokens per row, {args.threads} threads", "",
             f"Machine: {machine['cpu']}, {machine['usable_cpus']} CPUs; torch {machine['torch']}, transformers "
             f"{machine['transformers']}; {machine['date']}. Command: `{machine['command']}`.", "",
             f"Steady state (medians of {args.reps} alternating repetitions; best dtype of each side):", "",
             "| batch | ours default | ours eager | transformers | default / transformers | default / eager "
             "| default vs its batch 1 |", "|---:|---|---|---|---:|---:|---:|"]
    for b, t in table.items():
        def cell(r: dict) -> str:
            return f"{r['tokens_per_s']:.1f} ({r['dtype']})"
        lines.append(f"| {b} | {cell(t['default'])} | {cell(t['eager'])} | {cell(t['transformers'])} | "
                     f"**{t['default_over_transformers']:.2f}x** | {t['default_over_eager']:.2f}x | "
                     f"{t['default_over_default_batch1']:.2f}x |")
    lines += ["", "All figures, tokens/s (aggregate over the batch's rows):", "",
              "| impl | dtype | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
              "|---|---|" + "---:|" * len(args.batches)]
    for impl in impls:
        for dt in models:
            lines.append(f"| {impl} | {dt} | " + " | ".join(
                f"{results[f'{impl}/{dt}/{b}']['tokens_per_s']:.1f}" for b in args.batches) + " |")
    lines += ["", f"Default-path tokens equal the eager path's: {same}."]
    if firsts:
        lines += ["", f"First call of a fresh process (load, then one `la.generate` of {n} tokens, batch 1, bf16):",
                  "", "| inductor cache | path | load s | first call s | its tokens on the graph | compile left s |",
                  "|---|---|---:|---:|---:|---:|"]
        for k, v in firsts.items():
            cache, path_name = k.split(", ")
            lines.append(f"| {cache} | {path_name} | {v['load_s']:.1f} | {v['first_call_s']:.2f} | "
                         f"{v['compiled_steps']} of {n - 1} | {v['compile_left_s']:.1f} |")
    figures = {"model": MODEL, "prompt": PROMPT, "new_tokens": n, "reps": args.reps, "threads": args.threads,
               "results": results, "by_batch": {str(b): {k: (v if not isinstance(v, dict) else
                                                             f"{v['impl']}/{v['dtype']}")
                                                         for k, v in t.items()} for b, t in table.items()},
               "default_tokens_equal_eager": same, "first_call": firsts}
    js, md = write_results(args.out, figures, "\n".join(lines), machine)
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
