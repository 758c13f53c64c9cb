"""Helpers shared by the server benchmarks (serve_load.py, serve_throughput.py): untrained but non-trivial
adapters saved to a folder, the real server started as a subprocess on loopback, small PNG data URLs,
percentiles and process memory read from /proc."""

from __future__ import annotations

import base64
import gc
import io
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"  # la.load_pretrained()'s default: the embedded SmolLM2-135M


@dataclass
class AdapterSpec:
    """One adapter a benchmark loads: `kind` is "v1" (text) or "lavin" (efficientnet-lite0 vision: takes images)."""

    name: str
    kind: str
    seed: int


@dataclass
class SavedAdapter:
    name: str
    kind: str
    method: str
    folder: Path
    own_bytes: int  # bytes of the adapter's own tensors (its trainable parameters) as saved
    images: bool


def make_adapters(folder: Path, specs: Sequence[AdapterSpec], std: float = 0.05) -> dict[str, SavedAdapter]:
    """Attach each adapter to the embedded base, add seeded noise of `std` to every trainable tensor (non-zero
    gates and up-projections, so each adapter changes the output like a trained one) and save it with
    la.save_adapter. Nothing is trained."""
    import torch

    import llama_adapter as la

    out: dict[str, SavedAdapter] = {}
    for spec in specs:
        model, tok = la.load_pretrained(MODEL, progress=False)
        if spec.kind == "v1":
            la.attach(model, la.AdapterV1Config())
        elif spec.kind == "lavin":
            la.attach(model, la.LavinConfig(), tokenizer=tok)
        else:
            raise ValueError(f"unknown adapter kind {spec.kind!r} (v1 or lavin)")
        params = la.trainable_parameters(model)
        g = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
        path = Path(la.save_adapter(model, folder / spec.name))
        own = sum(p.numel() * p.element_size() for p in params.values())
        assert model.adapter is not None
        out[spec.name] = SavedAdapter(spec.name, spec.kind, model.adapter.method, path, own, spec.kind == "lavin")
        del model, tok, params
        gc.collect()
    return out


def png_data_url(seed: int, size: int = 64) -> str:
    """A small random-coloured PNG with a few rectangles, as a data: URL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        pixels[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default); None when empty."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process (shared storages counted once)."""
    import torch

    gc.collect()
    storages: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated module attributes warns
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                try:
                    storage = obj.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def load_label(before: float, after: float) -> str:
    return "other jobs competed for the cores: timings are noisy" if max(before, after) > 1.5 else "a quiet machine"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`llama-adapter serve` in a subprocess on a free loopback port; its output goes to `log`.

    Use as a context manager; `url` is the base URL (http://127.0.0.1:PORT), `pid` the server's process id
    (the Python process itself, so /proc/PID/status is the server's memory)."""

    def __init__(self, args: Sequence[str], log: Path, ready_timeout: float = 600.0):
        self.port = free_port()
        self.args = ["serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.command = "llama-adapter " + " ".join(self.args)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.ready_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        import httpx2

        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT / "src"), env.get("PYTHONPATH", "")] if p)
        t0 = time.perf_counter()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "llama_adapter.cli", *self.args], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode} before it was ready:\n"
                                 f"{self.command}\n{self.log_tail()}")
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if time.perf_counter() - t0 > self.ready_timeout:
                self.stop()
                raise SystemExit(f"the server was not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)
        self.ready_s = time.perf_counter() - t0
        return self

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGINT (uvicorn's graceful shutdown), SIGKILL after `grace` seconds; returns the exit code."""
        if self.proc is None or self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclass
class StreamResult:
    """One streamed request as the client saw it; times are seconds after the request was sent."""

    sent_at: float = 0.0  # time.perf_counter() when the request was sent
    status: int | None = None  # HTTP status; None: no response (connection error or timeout)
    error: str = ""  # the error's code/type (a refusal) or what went wrong (a lost request or a broken stream)
    first_s: float | None = None  # the first chunk with generated text
    last_s: float | None = None  # the last chunk with generated text
    total_s: float = 0.0  # until `data: [DONE]` (or the error)
    done: bool = False  # the stream ended with `data: [DONE]`
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the final usage chunk
    text_chunks: int = 0
    text: str = ""
    chunk_s: list[float] = field(default_factory=list)  # when each chunk with text came


def chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    """(generated text, finish_reason) of a chat.completion.chunk or a text_completion chunk."""
    text, finish = "", None
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        text += (delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or "")
        finish = choice.get("finish_reason") or finish
    return text, finish


async def stream_request(client: Any, path: str, body: dict[str, Any]) -> StreamResult:
    """POST `body` with stream=true (and usage requested) to `path` with an httpx2.AsyncClient and read the
    server-sent events to the end."""
    import json

    import httpx2

    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    res = StreamResult(sent_at=t0)
    try:
        async with client.stream("POST", path, json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                raw = await r.aread()
                try:
                    err = json.loads(raw)["error"]
                    res.error = str(err.get("code") or err.get("type"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    res.error = f"not OpenAI's error shape: {raw[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        res.done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = f"error event in the stream: {chunk['error']}"
                        break
                    text, finish = chunk_text(chunk)
                    if text:
                        now = time.perf_counter() - t0
                        res.first_s = now if res.first_s is None else res.first_s
                        res.last_s = now
                        res.text_chunks += 1
                        res.chunk_s.append(now)
                        res.text += text
                    res.finish_reason = finish or res.finish_reason
                    if chunk.get("usage"):
                        res.completion_tokens = chunk["usage"].get("completion_tokens")
                if not res.error and not res.done:
                    res.error = "the stream ended without data: [DONE]"
                elif res.done and res.finish_reason is None:
                    res.error = "no chunk carried a finish_reason"
    except (httpx2.HTTPError, ValueError) as e:  # connection refused/reset, timeout, malformed chunk
        res.error = f"{type(e).__name__}: {e}"
    res.total_s = time.perf_counter() - t0
    return res
