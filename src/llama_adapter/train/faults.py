"""What a training run does when something goes wrong: the errors it stops with and their exit codes.

Kept apart from the loop so the command line can map each to a documented exit code and a message
that says what to do next (docs/faults.md).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

EXIT_INTERRUPTED = 75  # stopped by SIGTERM/SIGINT after writing a checkpoint: rerun the same command to resume
CHECKPOINT_DELAY_ENV = "LLAMA_ADAPTER_TEST_CHECKPOINT_DELAY"  # tests only: seconds to stall mid-checkpoint


class TrainingInterrupted(Exception):
    """A signal stopped training at a step boundary, after a checkpoint was written."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, step: int, checkpoint: Path | None, signal_name: str):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "a checkpoint"
        super().__init__(f"{signal_name} received: stopped after step {step} and wrote {where}; rerun the same "
                         f"command (train.resume is on by default) to continue from step {step}")


class NonFiniteStop(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is untouched."""


def checkpoint_write_delay() -> None:
    """Stall in the middle of writing a checkpoint when the test-only environment variable asks, so a test
    can kill the process there."""
    delay = os.environ.get(CHECKPOINT_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def check_out_dir(out_dir: Path, need_bytes: int) -> None:
    """Before training: `out_dir` must be a writable folder with room for a checkpoint (`need_bytes`), so a
    run does not discover at its first save, hours in, that it cannot keep its work."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out_dir)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointWriteError(e.errno, f"train.out_dir {out_dir} is not writable ({reason}); choose another "
                                            f"out_dir or fix its permissions before training") from e
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise CheckpointWriteError(errno.ENOSPC, f"train.out_dir {out_dir} has {free / 2**20:,.1f} MiB free; a "
                                                 f"checkpoint needs about {need_bytes / 2**20:,.1f} MiB: free some "
                                                 f"space or choose another out_dir before training")


def non_finite(loss: float, params: Iterable[torch.Tensor]) -> str | None:
    """Why a step must be skipped ("non-finite loss", "non-finite gradient"), or None when it may be taken."""
    if not math.isfinite(loss):
        return "non-finite loss"
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return "non-finite gradient"
    return None


def checkpoint_bytes(params: Iterable[torch.Tensor]) -> int:
    """Room a run needs in out_dir: the kept checkpoints, the one being written and the final adapter, each the
    trained tensors plus two AdamW moments, and a margin for configs and logs."""
    tensors = sum(p.numel() * 4 for p in params)
    return 4 * 3 * tensors + (16 << 20)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete the temporary files and folders of writes that a killed run left half done (`.checkpoint-*`,
    `.*.tmp`); complete checkpoints are never touched."""
    for entry in out_dir.glob(".*"):
        if entry.is_dir() and entry.name.startswith(".checkpoint-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and (entry.name.endswith(".tmp") or entry.name.startswith(".write-test.")):
            entry.unlink(missing_ok=True)
