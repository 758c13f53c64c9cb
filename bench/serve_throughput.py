"""The server's targets (issue 35): batched decoding, mixed adapters, overhead over la.generate, memory per adapter.

One run of this script measures, on the embedded SmolLM2-135M with untrained adapters with randomised
non-zero weights (V1 text and LaVIN with efficientnet-lite0), the real server in a subprocess on loopback:
(a) aggregate decode tokens/s of 8 concurrent streams against a single stream (target >= 4x);
(b) 8 streams spread over 3 adapters (V1, LaVIN, a second V1) against 8 on the V1 adapter (target: within
    15%, i.e. >= 0.85x);
(c) one non-streamed /v1/completions request against la.generate in this process on the same prompt and
    max_tokens, on the base and on the V1 adapter (target: <= 1.10x; the two texts are compared too), with
    la.generate on the server's decode path (by default both on their compiled steps, warmed up first until their
    background compiles are done; with `--eager` the server runs `serve --eager` and la.generate its eager path);
(d) memory: the server's tensor bytes (every distinct tensor storage) and RSS after Server.load with 0..4
    adapters (LaVIN, V1, LaVIN, V1), each in a fresh process; every adapter after the first must cost at most
    its own weights + 10% (tensor bytes; RSS is shown, but cannot resolve a 0.6 MB adapter reliably).
Greedy /v1/completions on a plain prompt the base does not end early; tokens are those reported in `usage`.
(a)-(c) take a warm-up run of each contender, then `--reps` repetitions alternating the contenders (the order
rotated each repetition), and report medians. Decode tokens/s of a run: the tokens after each stream's first,
summed, over the time from the first stream's first token to the last stream's last token.
Writes bench/results/<name>.json and .md with each ratio, its target and PASS/MISS.

    python bench/serve_throughput.py [--max-tokens 64] [--reps 5] [--threads 2] [--dtype auto|fp32|bf16]
    python bench/serve_throughput.py --eager --name serve_throughput_eager
    python bench/serve_throughput.py --quick     # smoke run: 8 tokens, 1 repetition, memory with 0..2 adapters
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, median, write_results  # noqa: E402
from serve_common import (  # noqa: E402
    MODEL,
    AdapterSpec,
    SavedAdapter,
    ServerProcess,
    StreamResult,
    cpu_seconds,
    load_label,
    make_adapters,
    proc_status_bytes,
    stream_request,
    tensor_bytes,
)

PROMPT = "The history of the Roman empire is"
STREAMS = 8
SERVED = (AdapterSpec("v1", "v1", seed=1), AdapterSpec("lavin", "lavin", seed=2), AdapterSpec("v1b", "v1", seed=3))
MEMORY_ORDER = (AdapterSpec("lavin", "lavin", seed=2), AdapterSpec("v1", "v1", seed=1),
                AdapterSpec("lavin_b", "lavin", seed=4), AdapterSpec("v1_b", "v1", seed=3))
TARGETS = {"a": 4.0, "b": 0.85, "c": 1.10, "d": 1.10}


# ---------------------------------------------------------------- (a), (b): concurrent streams


async def run_streams(url: str, models: list[str], max_tokens: int, timeout: float) -> list[StreamResult]:
    import httpx2

    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    limits = httpx2.Limits(max_connections=len(models) + 2)
    async with httpx2.AsyncClient(base_url=url, timeout=httpx2.Timeout(timeout), limits=limits) as client:
        return list(await asyncio.gather(*(stream_request(client, "/v1/completions", {**body, "model": m})
                                           for m in models)))


def stream_figures(results: list[StreamResult], label: str) -> dict[str, Any]:
    """Decode tokens/s (tokens after each stream's first over first-first-token to last-last-token) and
    end-to-end tokens/s (all tokens over send to the last [DONE])."""
    for r in results:
        if r.status != 200 or r.error or r.completion_tokens is None or r.first_s is None or r.last_s is None:
            raise SystemExit(f"{label}: a stream failed: status {r.status}, {r.error or 'no usage or no text'}")
    tokens = [int(r.completion_tokens or 0) for r in results]
    start = min(r.sent_at for r in results)
    first = min(r.sent_at + (r.first_s or 0.0) for r in results)
    last = max(r.sent_at + (r.last_s or 0.0) for r in results)
    end = max(r.sent_at + r.total_s for r in results)
    decode_tokens = sum(t - 1 for t in tokens)
    # steady state: from the moment every stream has its first token until the first stream's last one,
    # counted in text chunks (about one per token)
    steady_from = max(r.sent_at + (r.first_s or 0.0) for r in results)
    steady_to = min(r.sent_at + (r.last_s or 0.0) for r in results)
    steady_chunks = sum(steady_from < r.sent_at + c <= steady_to for r in results for c in r.chunk_s)
    return {"streams": len(results), "tokens": tokens, "decode_s": last - first, "total_s": end - start,
            "decode_tokens_per_s": decode_tokens / (last - first) if last > first else 0.0,
            "e2e_tokens_per_s": sum(tokens) / (end - start),
            "steady_chunks_per_s": steady_chunks / (steady_to - steady_from) if steady_to > steady_from else None,
            "ttft_s": [r.first_s for r in results]}


# ---------------------------------------------------------------- (c): one request against la.generate


def completion(url: str, model: str, max_tokens: int, timeout: float) -> tuple[float, str, int]:
    import httpx2

    t = time.perf_counter()
    r = httpx2.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                   "temperature": 0}, timeout=timeout)
    dt = time.perf_counter() - t
    if r.status_code != 200:
        raise SystemExit(f"/v1/completions for {model}: {r.status_code} {r.text[:500]}")
    body = r.json()
    return dt, body["choices"][0]["text"], int(body["usage"]["completion_tokens"])


# ---------------------------------------------------------------- (d): memory after Server.load


def memory_probe(adapters: dict[str, str], threads: int, dtype: str) -> dict[str, int]:
    """In a fresh process: Server.load with `adapters`; its tensor bytes and RSS."""
    import torch

    from llama_adapter.serve import ServeConfig, Server

    torch.set_num_threads(threads)
    server = Server.load(ServeConfig(model=MODEL, adapters=adapters, dtype=dtype))
    gc.collect()
    try:  # give freed heap back so that RSS shows what is held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    held = tensor_bytes()
    rss = proc_status_bytes(os.getpid(), "VmRSS")
    del server
    return {"tensor_bytes": held, "rss_bytes": rss}


def memory_steps(saved: dict[str, SavedAdapter], steps: int, threads: int, dtype: str) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    rows = []
    for k in range(steps + 1):
        names = [s.name for s in MEMORY_ORDER[:k]]
        with ctx.Pool(1) as pool:
            got = pool.apply(memory_probe, ({n: str(saved[n].folder) for n in names}, threads, dtype))
        rows.append({"adapters": names, **got})
        print(f"memory with {k} adapters: tensors {got['tensor_bytes'] / 2**20:.2f} MiB, RSS "
              f"{got['rss_bytes'] / 2**20:.1f} MiB", flush=True)
    for prev, row in zip(rows, rows[1:]):
        added = saved[row["adapters"][-1]]
        row["added"] = added.name
        row["added_own_bytes"] = added.own_bytes
        row["tensor_delta_bytes"] = row["tensor_bytes"] - prev["tensor_bytes"]
        row["rss_delta_bytes"] = row["rss_bytes"] - prev["rss_bytes"]
        row["tensor_ratio"] = row["tensor_delta_bytes"] / added.own_bytes
        row["rss_ratio"] = row["rss_delta_bytes"] / added.own_bytes
    return rows


# ---------------------------------------------------------------- main


def alternate(contenders: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[Any]]:
    """A warm-up call of each contender, then `reps` rounds calling each once, the order rotated every round."""
    for name, fn in contenders.items():
        fn()
        print(f"warm-up {name} done", flush=True)
    names = list(contenders)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            out[n].append(contenders[n]())
        print(f"rep {rep + 1}/{reps} done", flush=True)
    return out


def verdict(ratio: float, target: float, at_least: bool) -> str:
    return "PASS" if (ratio >= target if at_least else ratio <= target) else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (and la.generate)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                    help="base dtype (server, la.generate); auto, the server's default: bf16 where the CPU runs it "
                         "natively, else fp32")
    ap.add_argument("--threads", type=int, default=bench_threads(), help="torch threads, here and in the server")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--eager", action="store_true",
                    help="serve --eager, against la.generate's eager path (default: both on their compiled steps)")
    ap.add_argument("--compile-warmup", type=float, default=240.0,
                    help="without --eager: seconds of single requests and 8-stream bursts (one adapter, mixed) while "
                         "the server compiles in the background")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 tokens, 1 repetition, memory with 0..2 adapters")
    ap.add_argument("--name", default=None,
                    help="results name (default serve_throughput, serve_throughput_quick with --quick)")
    a = ap.parse_args()
    if a.quick:
        a.max_tokens, a.reps, a.compile_warmup = 8, 1, min(a.compile_warmup, 30.0)
    name = a.name or ("serve_throughput_quick" if a.quick else "serve_throughput")
    memory_adapters = 2 if a.quick else len(MEMORY_ORDER)

    import torch

    import llama_adapter as la
    from llama_adapter.device import resolve_dtype
    from llama_adapter.model.fastpath import compiled_decode_of

    a.dtype = "bf16" if resolve_dtype(a.dtype) == torch.bfloat16 else "fp32"  # what "auto" chose, by name
    torch.set_num_threads(a.threads)
    n, t0 = a.max_tokens, time.time()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serve_throughput_") as tmp:
        saved = make_adapters(Path(tmp), list({s.name: s for s in (*SERVED, *MEMORY_ORDER)}.values()))

        memory = memory_steps(saved, memory_adapters, a.threads, a.dtype)

        flags = ["--model", MODEL]
        for s in SERVED:
            flags += ["--adapter", f"{s.name}={saved[s.name].folder}"]
        flags += ["--max-batch", str(STREAMS), "--max-queue", "64", "--threads", str(a.threads),
                  "--max-tokens", str(max(n, 512)), "--dtype", a.dtype, *(["--eager"] if a.eager else [])]
        base, tok = la.load_pretrained(MODEL, dtype=a.dtype, progress=False)
        with_v1, _ = la.load_pretrained(MODEL, dtype=a.dtype, progress=False)
        la.load_adapter(with_v1, saved["v1"].folder)
        for m in (base, with_v1):  # (c) is the server's own overhead: la.generate on the server's decode path
            if not a.eager:  # the default compiled step, its background compile awaited
                la.generate(m, tok, PROMPT, max_new_tokens=n)
                state = compiled_decode_of(m)
                assert state is not None and state.wait(600) and state.failed is None, "la.generate did not compile"
            else:
                la.disable_compiled_decode(m)
        with ServerProcess(flags, Path(tmp) / "server.log") as server:
            command = server.command.replace(tmp, "$TMP")
            print(f"server ready in {server.ready_s:.1f} s", flush=True)

            def streams(models: list[str]) -> Callable[[], dict[str, Any]]:
                return lambda: stream_figures(asyncio.run(run_streams(server.url, models, n, a.timeout)), str(models))

            mixed = [SERVED[i % len(SERVED)].name for i in range(STREAMS)]
            if not a.eager:  # lone requests, batches of v1 rows and mixed ones until the background compiles are done
                end = time.time() + a.compile_warmup  # (no signal: time)
                while time.time() < end:
                    for model in ("v1", "base"):
                        dt, _, _ = completion(server.url, model, n, a.timeout)
                        print(f"compile warm-up: {model} {n / dt:.1f} tokens/s", flush=True)
                    for label, models in ((f"{STREAMS} x v1", ["v1"] * STREAMS), ("mixed", mixed)):
                        burst = streams(models)()
                        print(f"compile warm-up: {label} {burst['decode_tokens_per_s']:.1f} tokens/s", flush=True)
                    time.sleep(10)

            runs = alternate({"1 stream, v1": streams(["v1"]), f"{STREAMS} streams, v1": streams(["v1"] * STREAMS),
                              f"{STREAMS} streams, v1/lavin/v1b": streams(mixed)}, a.reps)

            idle_cpu = [0.0]

            def generate(model: Any) -> Callable[[], tuple[float, str]]:
                def run() -> tuple[float, str]:
                    c0, t = cpu_seconds(server.pid), time.perf_counter()
                    text = la.generate(model, tok, PROMPT, max_new_tokens=n)[0]
                    dt = time.perf_counter() - t
                    idle_cpu[0] += cpu_seconds(server.pid) - c0
                    return dt, text
                return run

            def request(model: str) -> Callable[[], tuple[float, str, int]]:
                return lambda: completion(server.url, model, n, a.timeout)

            latency = alternate({"la.generate, base": generate(base), "server, base": request("base"),
                                 "la.generate, v1": generate(with_v1), "server, v1": request("v1")}, a.reps)
            generate_s = sum(dt for dt, _ in latency["la.generate, base"] + latency["la.generate, v1"])
            peak = proc_status_bytes(server.pid, "VmHWM")
        exit_code = server.returncode
    load_after = os.getloadavg()[0]

    med = {k: median([r["decode_tokens_per_s"] for r in v]) for k, v in runs.items()}
    med_e2e = {k: median([r["e2e_tokens_per_s"] for r in v]) for k, v in runs.items()}
    steady = {k: [r["steady_chunks_per_s"] for r in v if r["steady_chunks_per_s"] is not None] for k, v in runs.items()}
    med_steady = {k: median(v) if v else None for k, v in steady.items()}
    k1, k8, k3 = list(runs)
    tokens = {k: sorted({t for r in v for t in r["tokens"]}) for k, v in runs.items()}
    lat = {k: median([x[0] for x in v]) for k, v in latency.items()}
    texts_equal = {m: latency[f"la.generate, {m}"][0][1] == latency[f"server, {m}"][0][1] for m in ("base", "v1")}
    server_tokens = {m: sorted({x[2] for x in latency[f"server, {m}"]}) for m in ("base", "v1")}

    targets: list[dict[str, Any]] = [
        {"id": "a", "what": f"aggregate decode tokens/s, {STREAMS} streams vs 1 (one adapter)",
         "measured": f"{med[k8]:.1f} vs {med[k1]:.1f} tokens/s", "ratio": med[k8] / med[k1], "target": ">= 4x",
         "result": verdict(med[k8] / med[k1], TARGETS["a"], True)},
        {"id": "b", "what": f"{STREAMS} streams over 3 adapters vs {STREAMS} on one",
         "measured": f"{med[k3]:.1f} vs {med[k8]:.1f} tokens/s", "ratio": med[k3] / med[k8],
         "target": ">= 0.85x (within 15%)", "result": verdict(med[k3] / med[k8], TARGETS["b"], True)},
    ]
    for m in ("base", "v1"):
        r = lat[f"server, {m}"] / lat[f"la.generate, {m}"]
        targets.append({"id": "c", "what": f"one non-streamed request vs la.generate, {m}",
                        "measured": f"{lat[f'server, {m}']:.3f} vs {lat[f'la.generate, {m}']:.3f} s", "ratio": r,
                        "target": "<= 1.10x", "result": verdict(r, TARGETS["c"], False)})
    for row in memory[2:]:
        targets.append({"id": "d", "what": f"tensor bytes added by adapter {len(row['adapters'])} "
                                           f"({row['added']}) vs its own weights",
                        "measured": f"{row['tensor_delta_bytes']:,} vs {row['added_own_bytes']:,} bytes",
                        "ratio": row["tensor_ratio"], "target": "<= 1.10x",
                        "result": verdict(row["tensor_ratio"], TARGETS["d"], False)})

    figures = {
        "benchmark": "server targets (issue 35)", "model": MODEL, "prompt": PROMPT, "max_tokens": n,
        "dtype": a.dtype, "compile": not a.eager, "reps": a.reps, "threads": a.threads, "server_command": command,
        "server_exit_code": exit_code,
        "server_peak_rss_bytes": peak,
        "adapters": {s.name: {"method": s.method, "own_bytes": s.own_bytes, "images": s.images}
                     for s in saved.values()},
        "targets": targets,
        "streams": {k: {"median_decode_tokens_per_s": med[k], "median_e2e_tokens_per_s": med_e2e[k],
                        "median_steady_chunks_per_s": med_steady[k],
                        "tokens_per_stream_seen": tokens[k], "runs": v} for k, v in runs.items()},
        "latency": {"median_s": lat, "texts_equal": texts_equal, "server_completion_tokens": server_tokens,
                    "runs_s": {k: [x[0] for x in v] for k, v in latency.items()},
                    "server_cpu_s_while_la_generate_ran": round(idle_cpu[0], 3),
                    "la_generate_s_total": round(generate_s, 2)},
        "memory": memory,
        "contention": load_label(load_before, load_after),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "wall_s": round(time.time() - t0, 1),
    }
    machine = machine_info(("fastapi", "uvicorn"))
    md = [f"# Server targets (issue 35), {MODEL}, {machine['date']}", "",
          f"Machine: {machine['cpu']}, {machine['usable_cpus']} CPUs, torch {machine['torch']}, {a.threads} threads "
          f"in the server and here. Load: {figures['contention']} (1-minute load average "
          f"{figures['load_average_before_after'][0]} before, {figures['load_average_before_after'][1]} after).", "",
          f"Server: `{command}`. Greedy /v1/completions of `{PROMPT}`, max_tokens {n}; medians of {a.reps} "
          f"alternating repetitions after a warm-up. Untrained adapters with random non-zero weights.", "",
          "| target | what | measured | ratio | target | result |", "|---|---|---|---:|---|---|"]
    md += [f"| ({t['id']}) | {t['what']} | {t['measured']} | {t['ratio']:.3f} | {t['target']} | **{t['result']}** |"
           for t in targets]
    md += ["", "| streams | decode tokens/s (median) | end-to-end tokens/s | steady state, all streams running "
           "(chunks/s) | tokens per stream |", "|---|---:|---:|---:|---|"]
    md += [f"| {k} | {med[k]:.1f} | {med_e2e[k]:.1f} | "
           f"{'-' if med_steady[k] is None else f'{med_steady[k]:.1f}'} | {', '.join(map(str, tokens[k]))} |"
           for k in runs]
    md += ["", f"Server and la.generate texts equal: base {texts_equal['base']}, v1 {texts_equal['v1']}; tokens the "
           f"server produced: base {server_tokens['base']}, v1 {server_tokens['v1']} (of {n}). The idle server used "
           f"{idle_cpu[0]:.2f} CPU s while la.generate ran {generate_s:.1f} s.", "",
           "| adapters loaded (fresh process each) | tensor MiB | RSS MiB | added | tensor bytes added / own | "
           "RSS added / own |", "|---|---:|---:|---|---:|---:|"]
    for row in memory:
        extra = (f"{row['added']} ({row['added_own_bytes']:,} B) | {row['tensor_ratio']:.3f} | {row['rss_ratio']:.2f}"
                 if "added" in row else "- | - | -")
        md.append(f"| {', '.join(row['adapters']) or 'none (base)'} | {row['tensor_bytes'] / 2**20:.2f} | "
                  f"{row['rss_bytes'] / 2**20:.1f} | {extra} |")
    md += ["", "The first adapter's cost includes what it shares with later ones (LaVIN's frozen efficientnet-lite0, "
           "loaded once); the target is judged on the adapters after it. Server peak RSS (VmHWM): "
           f"{peak / 2**20:.0f} MiB. Wall time {figures['wall_s']} s."]
    js, mdp = write_results(name, figures, "\n".join(md), machine)
    print("\n".join(md))
    print(f"wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
