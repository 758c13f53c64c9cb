"""Shared helpers for the server's tests: run an app with uvicorn on loopback in a thread, build a tiny
random model folder with a few saved adapters, and make images as data: URLs.

Usage:
    with serving(create_app(server)) as url:      # url = "http://127.0.0.1:PORT"
        client = openai_client(url)
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import save_tiny_folder

import llama_adapter as la

# The tiny model of conftest with a longer context, so that a stream can run long enough to be cut off.
CONTEXT = 1024
VISION = "efficientnet-lite0"


@contextmanager
def serving(app: Any, startup_timeout: float = 60.0) -> Iterator[str]:
    """Run an ASGI app with uvicorn on 127.0.0.1 at a free port (the kernel picks it) in a thread;
    yields the base URL and stops the server (should_exit, join) on exit."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)  # requests still open at exit are cut after 5 s
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn stopped before it started (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start within {startup_timeout} s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop within 30 s"


@contextmanager
def serve(config: Any) -> Iterator[tuple[str, Any]]:
    """Load a Server from a ServeConfig and run its app; yields (base URL, server)."""
    from llama_adapter.serve import Server, create_app

    server = Server.load(config)
    with serving(create_app(server)) as url:
        yield url, server


@contextmanager
def paced(server: Any, seconds: float = 0.01) -> Iterator[None]:
    """Each decode step of the server takes at least `seconds`: a test that must act in the middle of an
    answer (hang up, press stop) then holds on a machine fast enough to finish the tiny model's answer first."""
    step = server.scheduler._step

    def slow_step(batch: Any) -> None:
        time.sleep(seconds)
        step(batch)

    server.scheduler._step = slow_step
    try:
        yield
    finally:
        del server.scheduler._step  # the class's method again


def openai_client(url: str, api_key: str = "no-key", timeout: float = 60.0) -> Any:
    """The official client pointed at our server; no retries, so a 429 or 5xx is seen as it is."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout)


# ---------------------------------------------------------------------------------------------------
# tiny model and adapters


@dataclass
class TinyZoo:
    """A tiny random model folder and adapters saved from it (each acts: none equals the base)."""

    folder: Path
    adapters: dict[str, Path]  # name -> adapter folder: v1, v1b, lavin (text-only), v1img (takes images)

    @property
    def text_adapters(self) -> list[str]:
        return [n for n in self.adapters if n != "v1img"]


def _randomise(model: la.LlamaLM, seed: int, gate: float | None, std: float) -> None:
    """Trained-looking parameters: gates (1-d, named *gate*) set to `gate`, everything else noise of `std`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in la.trainable_parameters(model).items():
            if gate is not None and "gate" in name.rsplit(".", 1)[-1]:
                p.fill_(gate)
            else:
                p.add_(torch.randn(p.shape, generator=g) * std)


def save_v1(folder: Path, out: Path, seed: int, vision: str | None = None) -> Path:
    model, _ = la.load_pretrained(folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2, vision=vision))
    _randomise(model, seed, gate=1.0, std=1.0)
    return la.save_adapter(model, out)


def save_lavin(folder: Path, out: Path, seed: int) -> Path:
    """Text-only LaVIN with its zero-initialised up-projections (and routers) randomised so it acts."""
    model, tok = la.load_pretrained(folder)
    la.attach(model, la.LavinConfig(vision=None, dropout=0.0), tokenizer=tok)
    _randomise(model, seed, gate=None, std=0.05)
    return la.save_adapter(model, out)


def build_zoo(root: Path) -> TinyZoo:
    folder = save_tiny_folder(root / "tiny", max_position_embeddings=CONTEXT)
    adapters = {
        "v1": save_v1(folder, root / "v1", seed=1),
        "v1b": save_v1(folder, root / "v1b", seed=2),
        "lavin": save_lavin(folder, root / "lavin", seed=3),
        "v1img": save_v1(folder, root / "v1img", seed=4, vision=VISION),
    }
    return TinyZoo(folder, {name: Path(path) for name, path in adapters.items()})


def load_reference(zoo: TinyZoo, name: str) -> tuple[la.LlamaLM, la.Tokenizer]:
    """The same model + adapter the server serves under `name` ("base": none), loaded in-process."""
    model, tok = la.load_pretrained(zoo.folder)
    if name != "base":
        la.load_adapter(model, zoo.adapters[name], tokenizer=tok)
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------------
# images


def random_image(width: int = 32, height: int = 32, seed: int = 0) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_url(image: Any, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, *urls: str) -> dict[str, Any]:
    """A user chat message with a text part and one image_url part per URL."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": parts}
