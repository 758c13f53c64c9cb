"""SIGTERM and SIGINT during training: stop at the next step boundary with a checkpoint, not mid-write.

Schedulers pre-empt jobs with SIGTERM (then SIGKILL after a grace period) and people press Ctrl-C.
The first signal only sets a flag; the trainer checks it between steps (all ranks agree under
torchrun), writes a checkpoint and stops with TrainingInterrupted (exit code 75 on the command
line). A second signal exits at once with 128 + the signal number: checkpoints are written to a
temporary folder and renamed into place, so the last complete one is never damaged.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """While active (a context manager), the first SIGTERM/SIGINT sets `requested` to the signal's name."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"\n{name} received: finishing the current step, then writing a checkpoint and stopping "
                  f"(send it again to exit at once; the last complete checkpoint stays intact)",
                  file=sys.stderr, flush=True)
            return
        print(f"\n{name} received again: exiting at once (exit code {128 + signum}); the last complete "
              f"checkpoint is intact: rerun the same command to resume from it", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
