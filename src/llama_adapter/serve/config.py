"""The server's settings, one typed record for the CLI, the Python API and the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..model.load import DEFAULT_MODEL
from ..model.quantize import check_quantize

API_KEY_ENV = "LLAMA_ADAPTER_API_KEY"


@dataclass
class ServeConfig:
    """What `llama-adapter serve` loads and the limits it enforces (every limit answers a clear 4xx)."""

    model: str = DEFAULT_MODEL
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> adapter folder or file (any format)
    experts: list[str] = field(default_factory=list)  # expert specs (ocr, caption:DIR, ...) run on request images
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 64  # requests waiting for a slot; beyond: 429
    max_tokens: int = 512  # the largest max_tokens a request may ask for (also the default)
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on every endpoint but /health
    allow_remote_images: bool = False  # fetch http(s) image URLs and read local paths
    max_body_bytes: int = 16 * 2**20
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 1  # images per request (each method reads one image per example)
    dtype: str | None = "auto"  # bf16 where it runs natively (an AMX or AVX512-BF16 CPU, most GPUs), else fp32
    device: str | None = None
    quantize: str | None = None  # int8 or int4: the frozen base's linears packed (docs/quantization.md)
    # decode on compiled steps where la.generate would (on a CPU: compiled in the background while the first
    # requests decode eagerly; serve/engine.py); False: every step eager (--eager)
    compile: bool = True
    force: bool = False  # load adapters that name another base model (their tensors must still fit)

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        for name in ("max_batch", "max_tokens", "max_body_bytes", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.max_images < 0:
            raise ValueError("max_queue and max_images must be >= 0")
        self.quantize = check_quantize(self.quantize)
        reserved = {"base"} & set(self.adapters)
        if reserved:
            raise ValueError("'base' names the bare base model; give the adapter another name")
