"""Linear warmup, then a half-cosine decay, evaluated per optimizer step."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
