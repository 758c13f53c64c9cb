"""AdamW with no weight decay on gates and 1-D tensors (biases, scales, norms), and a
learning-rate multiplier per parameter (the method's `lr_scale`), kept in each group's "lr_scale"."""

from __future__ import annotations

from collections.abc import Mapping

import torch

NO_DECAY_MARKERS = ("gate",)


def decays(name: str, p: torch.Tensor) -> bool:
    return p.dim() >= 2 and not any(m in name.rsplit(".", 1)[-1] for m in NO_DECAY_MARKERS)


def build_optimizer(params: dict[str, torch.nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float], lr_scales: Mapping[str, float] | None = None) -> torch.optim.AdamW:
    lr_scales = lr_scales or {}
    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for n, p in params.items():
        buckets.setdefault((float(lr_scales.get(n, 1.0)), decays(n, p)), []).append(p)
    groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale,
               "lr": lr * scale} for (scale, decay), ps in sorted(buckets.items())]
    # Parameters whose grad is None (another data kind's group) are skipped entirely by AdamW:
    # no moment update and no weight decay.
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
