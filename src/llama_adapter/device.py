"""Device and dtype handling, in one place, so the rest of the code never guesses."""

from __future__ import annotations

import contextlib

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
    """Map a name to a torch dtype; refuse fp16 on a CPU, where it is hundreds of times slower."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
        dtype = _DTYPES[dtype]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError(
            "fp16 on a CPU is refused: CPUs have no fast fp16 matrix multiply (it runs "
            "hundreds of times slower than fp32); use bf16 or fp32 on the CPU, fp16 on a GPU"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed-precision context: autocast to a low-precision dtype, a no-op for fp32/None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
