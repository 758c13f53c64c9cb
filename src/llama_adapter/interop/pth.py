"""Read reference `.pth` checkpoints safely: tensors and plain containers only, never code."""

from __future__ import annotations

import argparse
import io
import pickle
from pathlib import Path
from typing import Any

import torch

# argparse.Namespace is the only non-container object the reference checkpoints hold (LaVIN's run args);
# it rebuilds from a dict of attributes and runs no code of the file's choosing.
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def _read_bytes(path: Path, progress: bool) -> io.BytesIO:
    """The file's bytes, with a progress bar for large files (torch.load itself reports nothing)."""
    from tqdm import tqdm

    size = path.stat().st_size
    buf = io.BytesIO()
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                                     disable=not progress or size < 64 << 20) as bar:
        while chunk := f.read(16 << 20):
            buf.write(chunk)
            bar.update(len(chunk))
    buf.seek(0)
    return buf


def read_pth(path: str | Path, progress: bool = False) -> Any:
    """`torch.load(weights_only=True)` with clear errors: a file that needs more is refused, not run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(_read_bytes(path, progress), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise ValueError(f"{path} refused: it needs more than tensors to load (unpickling it would run or "
                             f"import code: {_global_named(str(e)) or reason}). Only weights-only .pth files are "
                             f"read; re-save the state dict alone with torch.save") from None
        raise ValueError(f"{path} is not a readable .pth file (truncated or corrupt): {reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError) as e:
        raise ValueError(f"{path} is not a readable .pth file (truncated or corrupt): "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def _global_named(message: str) -> str:
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.strip()
    return ""


def state_dict_of(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a flat state dict or {'model': state dict, ...}; `module.` prefixes dropped."""
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (or a dict with a 'model' entry)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: the state dict has entries that are not tensors: {sorted(map(str, bad))[:5]}")
    return {str(k).removeprefix("module."): v for k, v in state.items()}
