"""Batch-1 greedy decoding speed: llama_adapter against transformers' generate, same weights.

Run: python bench/decode.py [--new-tokens 128] [--reps 5] [--threads 2] [--no-compile]

Both implementations decode exactly --new-tokens tokens greedily (transformers with
min_new_tokens; ours with end-of-sequence ignored) from the same prompt, in fp32 and bf16,
in one process, alternating between implementations on every repetition after a warm-up.
Ours is measured eagerly and with the opt-in compiled decode step (compile time reported).
The bandwidth bound is measured read bandwidth / bytes of weights read per token.
Writes bench/results/decode.json and bench/results/decode.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import machine_info, median, memory_bandwidth, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.generate import Sampling, generate_tokens  # noqa: E402
from llama_adapter.model.fastpath import disable_compiled_decode, enable_compiled_decode  # noqa: E402
from llama_adapter.model.load import resolve_model_path  # noqa: E402

PROMPT = "The history of the Roman empire is"
MODEL = "smollm2-135m"


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every linear in the blocks plus the output head
    (the embedding lookup reads one row and is not counted)."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("layers.") and p.dim() == 2:
            total += p.numel() * p.element_size()
    head = model.lm_head.weight
    return total + head.numel() * head.element_size()


def ours_runner(model, tok, ids: list[int], n: int):
    free = copy.copy(tok)
    free.eos_ids = {-1}  # never stop early: decode exactly n tokens

    def run() -> tuple[int, list[int]]:
        out = [int(t) for t in generate_tokens(model, free, [ids], Sampling(max_new_tokens=n))]
        return len(out), out
    return run


def hf_runner(model, ids: list[int], n: int, pad_id: int):
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)

    def run() -> tuple[int, list[int]]:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad_id)
        new = out[0, input_ids.shape[1]:].tolist()
        return len(new), new
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled (opt-in) variant of ours")
    ap.add_argument("--out", default="decode", help="results name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens

    from transformers import AutoModelForCausalLM

    path = str(resolve_model_path(MODEL, progress=False))
    runners: dict[str, Callable[[], tuple[int, list[int]]]] = {}
    bytes_per_token: dict[str, int] = {}
    compile_s: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    ours_models = {}
    for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, tok = la.load_pretrained(MODEL, dtype=dt_name, progress=False)
        ids = tok.encode(PROMPT)
        ours_models[dt_name] = model
        bytes_per_token[dt_name] = weight_bytes_per_token(model)
        runners[f"ours-eager/{dt_name}"] = ours_runner(model, tok, ids, n)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dt).eval()
        runners[f"transformers/{dt_name}"] = hf_runner(hf, ids, n, tok.pad_id)
        if not args.no_compile:
            # a second handle on the same weights, with the compiled decode step switched on
            runners[f"ours-compiled/{dt_name}"] = ours_runner(model, tok, ids, n)

    states = {dt: enable_compiled_decode(m) for dt, m in ours_models.items()} if not args.no_compile else {}

    def run(key: str) -> tuple[float, int, list[int]]:
        impl, dt_name = key.split("/")
        if impl.startswith("ours"):
            disable_compiled_decode(ours_models[dt_name])
            if impl == "ours-compiled":
                ours_models[dt_name]._compiled_decode = states[dt_name]
        t = time.perf_counter()
        count, out = runners[key]()
        return time.perf_counter() - t, count, out

    # warm-up (the compiled variant compiles here; its first call is timed as compile time)
    for key in runners:
        dt, count, out = run(key)
        if key.startswith("ours-compiled/"):
            state = states[key.split("/")[1]]
            if state.failed or not state.compiled_steps:
                raise SystemExit(f"compiled decoding failed: {state.failed}")
            compile_s[key] = dt
        tokens[key] = out
        print(f"warm-up {key:24s} {dt:7.2f} s  {count} tokens", flush=True)
    for key in compile_s:  # compile time = first call minus a steady call
        compile_s[key] = max(0.0, compile_s[key] - run(key)[0])

    bw = memory_bandwidth(512)
    print(f"bandwidth: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s", flush=True)

    times: dict[str, list[float]] = {k: [] for k in runners}
    counts: dict[str, int] = {}
    for rep in range(args.reps):
        for key in runners:  # alternate implementations on every repetition
            dt, count, _ = run(key)
            times[key].append(dt)
            counts[key] = count
        print(f"rep {rep + 1}: " + "  ".join(f"{k} {counts[k] / times[k][-1]:.1f}" for k in runners), flush=True)

    results = {}
    for key, ts in times.items():
        impl, dt_name = key.split("/")
        tps = counts[key] / median(ts)
        bound = bw["read_gbps"] * 1e9 / bytes_per_token[dt_name]
        copy_bound = bw["copy_gbps"] * 1e9 / bytes_per_token[dt_name]
        results[key] = {
            "impl": impl, "dtype": dt_name, "tokens": counts[key], "median_s": median(ts),
            "tokens_per_s": tps, "runs_s": ts, "bytes_per_token": bytes_per_token[dt_name],
            "bound_tokens_per_s": bound, "fraction_of_bound": tps / bound,
            "copy_bound_tokens_per_s": copy_bound, "fraction_of_copy_bound": tps / copy_bound,
        }
        if key in compile_s:
            results[key]["compile_s"] = compile_s[key]

    def best(prefix: str) -> tuple[str, float]:
        cands = {k: v["tokens_per_s"] for k, v in results.items() if k.startswith(prefix)}
        k = max(cands, key=cands.get)
        return k, cands[k]

    hf_key, hf_tps = best("transformers/")
    eager_key, eager_tps = best("ours-eager/")
    ratios = {"ours_eager_best_over_transformers_best": eager_tps / hf_tps}
    summary = {"transformers_best": hf_key, "ours_eager_best": eager_key}
    if not args.no_compile:
        comp_key, comp_tps = best("ours-compiled/")
        ratios["ours_compiled_best_over_transformers_best"] = comp_tps / hf_tps
        summary["ours_compiled_best"] = comp_key
    same = {dt: tokens.get(f"ours-compiled/{dt}") == tokens[f"ours-eager/{dt}"]
            for dt in ("fp32", "bf16") if f"ours-compiled/{dt}" in tokens}

    figures = {
        "benchmark": "batch-1 greedy decoding", "model": MODEL, "prompt": PROMPT, "new_tokens": n,
        "reps": args.reps, "threads": args.threads, "bandwidth": bw, "results": results,
        "ratios": ratios, "best": summary, "compiled_tokens_equal_eager": same,
    }
    machine = machine_info(("transformers",))

    lines = [
        f"# Batch-1 greedy decoding, {MODEL}, {n} new tokens, {args.threads} threads",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} CPUs; torch "
        f"{machine['torch']}, transformers {machine['transformers']}; {machine['date']}.",
        f"Measured read bandwidth {bw['read_gbps']:.1f} GB/s (copy {bw['copy_gbps']:.1f} GB/s counting bytes read"
        " and written; 512 MB randn buffers);"
        " bound = bandwidth / weight bytes read per token (all linears + lm_head), for the read and the copy"
        " bandwidth.",
        "",
        f"| impl | dtype | tokens/s (median of {args.reps}) | weight MB/token | read-bound tokens/s"
        " | achieved/read bound | copy-bound tokens/s | achieved/copy bound |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results.values():
        extra = f" (compile {r['compile_s']:.0f} s once)" if "compile_s" in r else ""
        lines.append(f"| {r['impl']}{extra} | {r['dtype']} | {r['tokens_per_s']:.1f} | "
                     f"{r['bytes_per_token'] / 1e6:.0f} | {r['bound_tokens_per_s']:.1f} | "
                     f"{r['fraction_of_bound']:.0%} | {r['copy_bound_tokens_per_s']:.1f} | "
                     f"{r['fraction_of_copy_bound']:.0%} |")
    lines += ["", f"- ours eager best ({eager_key}) / transformers best ({hf_key}): "
              f"**{ratios['ours_eager_best_over_transformers_best']:.2f}x**"]
    if not args.no_compile:
        lines.append(f"- ours compiled best ({summary['ours_compiled_best']}) / transformers best ({hf_key}): "
                     f"**{ratios['ours_compiled_best_over_transformers_best']:.2f}x**")
        lines.append(f"- compiled tokens equal eager tokens: {same}")
    js, md = write_results(args.out, figures, "\n".join(lines), machine)
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
