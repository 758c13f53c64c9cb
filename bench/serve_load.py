"""Load test of `llama-adapter serve` on loopback: many concurrent streaming clients, two adapters and the base.

The real server runs in a subprocess on the embedded SmolLM2-135M with two untrained adapters with
randomised non-zero weights: a V1 text adapter and a LaVIN adapter (efficientnet-lite0 vision: it takes
images). `--clients` concurrent clients send `--requests` streamed chat completions (greedy, `--max-tokens`
each), mixed evenly over the base, the V1 adapter and the LaVIN adapter; half of the LaVIN requests carry a
small PNG as a data: URL. Every request must end answered (200, streamed to `data: [DONE]`) or refused with
429 (queue full): the script exits 1 if one is lost, broken or answered with any other status. Reported:
each status's count, time to first token and total latency percentiles, aggregate completion tokens/s, the
server's peak memory (VmHWM), its flags. Writes bench/results/<name>.json and .md.

    python bench/serve_load.py [--clients 50] [--requests 200] [--max-tokens 32] [--max-batch 8] [--max-queue 64]
    python bench/serve_load.py --quick     # smoke run: 8 clients, 16 requests, 8 tokens, batch 2, queue 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, write_results  # noqa: E402
from serve_common import (  # noqa: E402
    MODEL,
    AdapterSpec,
    ServerProcess,
    StreamResult,
    load_label,
    make_adapters,
    percentile,
    png_data_url,
    proc_status_bytes,
    stream_request,
)

QUESTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "List four animals that live in the ocean.",
    "How do plants make their food?",
    "Describe a typical day of a student.",
    "What are the benefits of reading books?",
]
IMAGE_QUESTIONS = ["What colour is the background of this image?", "Describe the shapes in this picture.",
                   "How many rectangles are in the image?"]
ADAPTERS = (AdapterSpec("v1", "v1", seed=1), AdapterSpec("lavin", "lavin", seed=2))
MIX = ("base", "v1", "lavin")


@dataclass
class Planned:
    index: int
    model: str
    image: bool
    body: dict[str, Any]


def plan(n: int, max_tokens: int, images: list[str]) -> list[Planned]:
    """Requests i = 0..n-1: model MIX[i % 3]; every other LaVIN request carries an image."""
    out = []
    for i in range(n):
        model = MIX[i % len(MIX)]
        with_image = model == "lavin" and (i // len(MIX)) % 2 == 1
        if with_image:
            content: Any = [{"type": "text", "text": IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)]},
                            {"type": "image_url", "image_url": {"url": images[i % len(images)]}}]
        else:
            content = QUESTIONS[i % len(QUESTIONS)]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0}
        out.append(Planned(i, model, with_image, body))
    return out


async def drive(url: str, todo: list[Planned], clients: int, timeout: float,
                backoff: float) -> tuple[list[StreamResult], float]:
    """`clients` workers, each sending the next planned request when its last one has ended (`backoff`
    seconds after a 429; a refused request is counted, not retried)."""
    import httpx2

    results: list[StreamResult | None] = [None] * len(todo)
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for p in todo:
        queue.put_nowait(p)
    limits = httpx2.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx2.AsyncClient(base_url=url, timeout=httpx2.Timeout(timeout), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                p = queue.get_nowait()
                res = results[p.index] = await stream_request(client, "/v1/chat/completions", p.body)
                if res.status == 429:
                    await asyncio.sleep(backoff)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    assert all(r is not None for r in results)
    return [r for r in results if r is not None], wall


def outcome(r: StreamResult) -> str:
    if r.status == 200 and not r.error:
        return "answered"
    if r.status == 429:
        return "refused_429"
    if r.status is None or r.status == 200:
        return "lost"  # no response, or a stream that broke off
    return "5xx" if r.status >= 500 else "other_4xx"


def spread(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": (None if (v := percentile(values, q)) is None else round(v, 3)) for q in (50, 90, 99)} | {
        "max": round(max(values), 3) if values else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    ap.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue")
    ap.add_argument("--threads", type=int, default=bench_threads(), help="the server's --threads")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a client waits for its request to end")
    ap.add_argument("--backoff", type=float, default=1.0, help="seconds a client waits after a 429")
    ap.add_argument("--eager", action="store_true", help="serve --eager (default: the server's compiled steps)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 8 clients, 16 requests, 8 tokens, batch 2, queue 1 (some 429s)")
    ap.add_argument("--name", default=None, help="results name (default serve_load, serve_load_quick with --quick)")
    a = ap.parse_args()
    if a.quick:
        a.clients, a.requests, a.max_tokens, a.max_batch, a.max_queue = 8, 16, 8, 2, 1
    name = a.name or ("serve_load_quick" if a.quick else "serve_load")

    images = [png_data_url(seed) for seed in range(4)]
    todo = plan(a.requests, a.max_tokens, images)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        adapters = make_adapters(Path(tmp), ADAPTERS)
        flags = ["--model", MODEL]
        for ad in adapters.values():
            flags += ["--adapter", f"{ad.name}={ad.folder}"]
        flags += ["--max-batch", str(a.max_batch), "--max-queue", str(a.max_queue), "--threads", str(a.threads),
                  *(["--eager"] if a.eager else [])]
        with ServerProcess(flags, Path(tmp) / "server.log") as server:
            rss_ready = proc_status_bytes(server.pid, "VmRSS")
            print(f"server ready in {server.ready_s:.1f} s (pid {server.pid}, RSS {rss_ready / 2**20:.0f} MiB); "
                  f"{a.requests} requests from {a.clients} clients", flush=True)
            results, wall = asyncio.run(drive(server.url, todo, a.clients, a.timeout, a.backoff))
            import httpx2

            health = httpx2.get(server.url + "/health", timeout=30).status_code
            metrics = httpx2.get(server.url + "/metrics", timeout=30).status_code
            peak, rss_end = proc_status_bytes(server.pid, "VmHWM"), proc_status_bytes(server.pid, "VmRSS")
            exit_code = server.stop()
            log_tail = server.log_tail(2000)
            command = server.command.replace(tmp, "$TMP")
    load_after = os.getloadavg()[0]

    kinds = [outcome(r) for r in results]
    counts = Counter(kinds)
    statuses = Counter(str(r.status) for r in results)
    answered = [r for r, k in zip(results, kinds) if k == "answered"]
    tokens = [r.completion_tokens for r in answered]
    known = [t for t in tokens if t is not None]
    total_tokens = sum(known)
    problems = [f"request {i} ({p.model}{' + image' if p.image else ''}): {k}, status {r.status}: {r.error}"
                for i, (p, r, k) in enumerate(zip(todo, results, kinds)) if k not in ("answered", "refused_429")]
    problems += [f"request {i}: 429 with code {r.error!r} (want queue_full)" for i, (r, k) in
                 enumerate(zip(results, kinds)) if k == "refused_429" and r.error != "queue_full"]
    if exit_code == -9:
        problems.append("the server did not stop within 30 s of SIGINT and was killed")
    if health != 200 or metrics != 200:
        problems.append(f"after the load: GET /health {health}, GET /metrics {metrics}")
    if len(known) < len(answered):
        problems.append(f"{len(answered) - len(known)} answered streams had no usage chunk")

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(todo):
        groups.setdefault(p.model + (" + image" if p.image else ""), []).append(i)
    per_group = {}
    for g, idx in groups.items():
        ok = [results[i] for i in idx if kinds[i] == "answered"]
        per_group[g] = {"requests": len(idx), "answered": len(ok),
                        "refused_429": sum(kinds[i] == "refused_429" for i in idx),
                        "ttft_p50_s": percentile([r.first_s for r in ok if r.first_s is not None], 50),
                        "total_p50_s": percentile([r.total_s for r in ok], 50),
                        "completion_tokens": sum(r.completion_tokens or 0 for r in ok)}

    figures = {
        "benchmark": "server load test on loopback", "model": MODEL,
        "adapters": {ad.name: {"method": ad.method, "images": ad.images, "own_bytes": ad.own_bytes}
                     for ad in adapters.values()},
        "server_command": command, "server_flags": {"max_batch": a.max_batch, "max_queue": a.max_queue,
                                                    "threads": a.threads, "eager": a.eager},
        "backoff_after_429_s": a.backoff,
        "clients": a.clients, "requests": a.requests, "max_tokens": a.max_tokens, "endpoint": "/v1/chat/completions",
        "stream": True, "temperature": 0, "mix": {g: len(idx) for g, idx in groups.items()},
        "outcomes": {k: counts.get(k, 0) for k in ("answered", "refused_429", "other_4xx", "5xx", "lost")},
        "http_statuses": dict(statuses),
        "ttft_s": spread([r.first_s for r in answered if r.first_s is not None]),
        "total_s": spread([r.total_s for r in answered]),
        "refusal_s": spread([r.total_s for r, k in zip(results, kinds) if k == "refused_429"]),
        "answered_without_text": sum(r.first_s is None for r in answered),
        "completion_tokens": total_tokens, "wall_s": round(wall, 2),
        "aggregate_tokens_per_s": round(total_tokens / wall, 2),
        "requests_per_s": round(len(answered) / wall, 3),
        "server_ready_s": round(server.ready_s, 1),
        "server_rss_ready_bytes": rss_ready, "server_rss_end_bytes": rss_end, "server_peak_rss_bytes": peak,
        "server_exit_code": exit_code, "per_group": per_group,
        "contention": load_label(load_before, load_after),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "problems": problems,
        "results": [{"model": p.model, "image": p.image, "status": r.status, "error": r.error,
                     "ttft_s": r.first_s, "total_s": r.total_s, "completion_tokens": r.completion_tokens,
                     "finish_reason": r.finish_reason} for p, r in zip(todo, results)],
    }
    machine = machine_info(("fastapi", "uvicorn"))
    o, t, ttft, lim = figures["outcomes"], figures["total_s"], figures["ttft_s"], figures["refusal_s"]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    md = [f"# Server load test: {a.clients} concurrent clients, {a.requests} streamed requests, {machine['date']}", "",
          f"Machine: {machine['cpu']}, {machine['usable_cpus']} CPUs, torch {machine['torch']}, fastapi "
          f"{machine['fastapi']}, uvicorn {machine['uvicorn']}. Load: {figures['contention']} (1-minute load "
          f"average {figures['load_average_before_after'][0]} before, {figures['load_average_before_after'][1]} "
          f"after; the clients run on the same cores as the server).", "",
          f"Server: `{command}` ({MODEL}; adapters: V1 text `v1`, LaVIN with efficientnet-lite0 `lavin`, untrained "
          f"with random non-zero weights). Requests: chat completions, streamed, greedy, max_tokens "
          f"{a.max_tokens}; a client waits {a.backoff:g} s after a 429 (a refused request is not retried); mix: "
          + ", ".join(f"{g} {n}" for g, n in figures["mix"].items()) + ".", "",
          "| outcome | requests |", "|---|---:|",
          f"| answered (200, streamed to `[DONE]`) | {o['answered']} |", f"| refused, 429 queue full | "
          f"{o['refused_429']} |", f"| other 4xx | {o['other_4xx']} |", f"| 5xx | {o['5xx']} |",
          f"| lost (no response, broken stream) | {o['lost']} |", "",
          "| latency of answered requests (s) | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|",
          f"| time to first token | {cell(ttft['p50'])} | {cell(ttft['p90'])} | {cell(ttft['p99'])} | "
          f"{cell(ttft['max'])} |",
          f"| total | {cell(t['p50'])} | {cell(t['p90'])} | {cell(t['p99'])} | {cell(t['max'])} |",
          f"| a 429 refusal | {cell(lim['p50'])} | {cell(lim['p90'])} | {cell(lim['p99'])} | {cell(lim['max'])} |",
          "",
          f"Aggregate: **{figures['aggregate_tokens_per_s']} completion tokens/s** ({total_tokens} tokens in "
          f"{figures['wall_s']} s, {figures['requests_per_s']} answered requests/s). Server memory: **peak "
          f"{peak / 2**20:.0f} MiB** (VmHWM; {rss_ready / 2**20:.0f} MiB when ready, {rss_end / 2**20:.0f} MiB "
          f"after the load). Server exit code after SIGINT: {exit_code}.", "",
          "| requests | count | answered | 429 | TTFT p50 (s) | total p50 (s) | completion tokens |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {g} | {v['requests']} | {v['answered']} | {v['refused_429']} | {cell(v['ttft_p50_s'])} | "
           f"{cell(v['total_p50_s'])} | {v['completion_tokens']} |" for g, v in per_group.items()]
    md += ["", "Problems: " + ("none" if not problems else "; ".join(problems[:20]))]
    js, mdp = write_results(name, figures, "\n".join(md), machine)
    print("\n".join(md))
    print(f"wrote {js} and {mdp}")
    if problems:
        print(f"FAILED: {len(problems)} problems; server log tail:\n{log_tail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
