"""Device and dtype handling, in one place, so the rest of the code never guesses."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """Map a name to a torch dtype; refuse fp16 on a CPU, where it is hundreds of times slower. "auto": bf16
    where it runs natively (`has_fast_bf16`), else fp32."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16 if has_fast_bf16(torch.device(device)) else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16, auto")
        dtype = _DTYPES[dtype]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError(
            "fp16 on a CPU is refused: CPUs have no fast fp16 matrix multiply (it runs "
            "hundreds of times slower than fp32); use bf16 or fp32 on the CPU, fp16 on a GPU"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}")
    return dtype


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Xeon Sapphire Rapids and later): oneDNN's matrix kernels differ there."""
    return bool(torch.cpu._is_amx_tile_supported())


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: a CUDA GPU that supports them, or a CPU with AMX or
    AVX512-BF16. Elsewhere bf16 is emulated: on an AVX512 CPU without BF16 its matmuls ran at a
    quarter of fp32's rate and a V1 training step took twice as long (bench/results/train_step_avx512.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_amx() or torch.cpu._is_avx512_bf16_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training precision ("fp32", "bf16", or "auto": bf16 where it is
    native, see `has_fast_bf16`, else fp32); None means plain fp32."""
    if precision == "auto":
        precision = "bf16" if has_fast_bf16(device) else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context: autocast to a low-precision dtype, a no-op for fp32/None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(n: int | None) -> None:
    """Set torch's CPU thread count; None or 0 keeps the default."""
    if n:
        torch.set_num_threads(n)


def switched_on(variable: str) -> bool:
    """A process-wide switch from the environment, on unless set to "0", "off", "false" or "no"."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "off", "false", "no")
