"""Training checkpoints: the adapter (safetensors) plus optimizer, RNG and data positions.

Each checkpoint is a folder written atomically; `latest` names the newest. Trainer state is
loaded with `weights_only=True`, so loading never runs pickled code.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_folder, atomic_write_text
from ..methods.io import save_adapter

STATE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_fingerprint(examples: Sequence[Any]) -> dict[str, Any]:
    """The count and a digest of the token ids, labels and image names of one training set:
    resuming on other data would silently splice two different runs."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(array("q", ex.input_ids).tobytes())
        h.update(array("q", ex.labels).tobytes())
        image = getattr(ex, "image", None)  # by name: a data folder that moves is still the same data
        h.update(b"-" if image is None else Path(image).name.encode())
    return {"examples": len(examples), "sha256": h.hexdigest()}


def _describe(fingerprint: dict[str, Any] | None) -> str:
    return "none" if fingerprint is None else f"{fingerprint['examples']:,} examples"


def check_same_data(folder: Path, saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume a checkpoint on training data other than its own."""
    for kind in sorted(set(saved) | set(now)):
        before, after = saved.get(kind), now.get(kind)
        if before == after:
            continue
        same_count = before is not None and after is not None and before["examples"] == after["examples"]
        raise ValueError(
            f"{folder} was trained on other {kind!r} data ({_describe(before)} then, {_describe(after)} now"
            f"{', the same count but other content' if same_count else ''}); resume it on its own data, or "
            f"start over with train.resume=false or another out_dir")


def save_checkpoint(out_dir: Path, step: int, model, optimizer, extra: dict[str, Any], keep: int = 2) -> Path:
    folder = out_dir / f"checkpoint-{step:07d}"

    def fill(tmp: Path) -> None:
        save_adapter(model, tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **extra}
        torch.save(state, tmp / STATE)

    atomic_folder(folder, fill)
    atomic_write_text(out_dir / "latest", folder.name + "\n")
    for old in sorted(out_dir.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "latest"
    if not pointer.is_file():
        return None
    folder = out_dir / pointer.read_text().strip()
    if not (folder / STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {folder}, which has no {STATE}; remove {pointer} to start over")
    return folder


def load_trainer_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {folder / STATE}: {e}") from e
