"""Training checkpoints: the adapter (safetensors) plus optimizer, RNG and data positions.

Each checkpoint is a folder written atomically; `latest` names the newest. Trainer state is
loaded with `weights_only=True`, so loading never runs pickled code.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checksum import ChecksumError, record_checksums, verify_checksums
from ..fileio import atomic_folder, atomic_write_text
from .faults import CheckpointWriteError, checkpoint_write_delay

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


def save_checkpoint(out_dir: Path, step: int, save_adapter: Callable[[Path], Any], optimizer,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    """`save_adapter(folder)` writes the adapter's own files (the attached method knows what they are)."""
    folder = out_dir / f"checkpoint-{step:07d}"

    def fill(tmp: Path) -> None:
        save_adapter(tmp)
        checkpoint_write_delay()  # tests only: a window to kill the process mid-write
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **extra}
        torch.save(state, tmp / STATE)
        record_checksums(tmp, [STATE])  # the adapter's files are already listed by save_adapter

    try:
        atomic_folder(folder, fill)
        atomic_write_text(out_dir / "latest", folder.name + "\n")
    except OSError as e:
        previous = [p.name for p in sorted(out_dir.glob("checkpoint-*")) if p != folder]
        kept = f"the previous checkpoint {out_dir / previous[-1]} is intact" if previous else "no earlier checkpoint"
        raise CheckpointWriteError(e.errno, f"could not write checkpoint {folder} ({e.strerror or e}); {kept}. "
                                            f"Free space (or fix permissions) and rerun to resume") from e
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


def checkpoint_candidates(out_dir: Path) -> list[Path]:
    """The checkpoint folders of `out_dir`, newest first (by step; `latest` is only a hint, since a write
    that died between the folder and the pointer leaves a complete folder the pointer does not name)."""
    folders = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and p.name[len("checkpoint-"):].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len("checkpoint-"):]), reverse=True)


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its checksum (the trainer knows no adapter file layout: the
    manifest lists whatever the method wrote) and return its trainer state; ValueError (ChecksumError for a
    mismatch) naming the file otherwise. An old checkpoint without checksums: its trainer state must parse."""
    verify_checksums(folder)
    if not (folder / STATE).is_file():
        raise FileNotFoundError(f"{folder / STATE} is missing")
    return load_trainer_state(folder)


def resumable_checkpoint(out_dir: Path, warn: Callable[[str], None] | None = print
                         ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `out_dir` that verifies, with its trainer state; each one passed over is
    reported through `warn` (unless None) and renamed `corrupt-checkpoint-...` (kept for inspection, out of
    the way of the next saves). None when there is no checkpoint; an error when there are some and none verifies."""
    problems = []
    for folder in checkpoint_candidates(out_dir):
        try:
            state = verify_checkpoint(folder)
        except (ChecksumError, ValueError, OSError) as e:
            problems.append(f"{folder.name}: {e}")
            continue
        if problems and warn is not None:  # warn=None: another rank reports and tidies
            for bad in problems:
                name = bad.split(":", 1)[0]
                aside = out_dir / f"corrupt-{name}"
                shutil.rmtree(aside, ignore_errors=True)
                (out_dir / name).rename(aside)
                warn(f"warning: checkpoint {out_dir / name} does not verify ({bad.split(': ', 1)[1]}); moved it "
                     f"to {aside}")
            warn(f"warning: resuming from {folder}, the newest checkpoint that verifies")
        return folder, state
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"no checkpoint in {out_dir} verifies:\n  {listing}\nremove them (or set train.resume=false "
                         f"or another out_dir) to start over")
    return None
