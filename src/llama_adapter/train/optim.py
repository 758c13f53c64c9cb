"""AdamW with no weight decay on gates and 1-D tensors (biases, scales, norms)."""

from __future__ import annotations

import torch

NO_DECAY_MARKERS = ("gate",)


def decays(name: str, p: torch.Tensor) -> bool:
    return p.dim() >= 2 and not any(m in name.rsplit(".", 1)[-1] for m in NO_DECAY_MARKERS)


def build_optimizer(params: dict[str, torch.nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.AdamW:
    decay = [p for n, p in params.items() if decays(n, p)]
    no_decay = [p for n, p in params.items() if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Parameters whose grad is None (another data kind's group) are skipped entirely by AdamW:
    # no moment update and no weight decay.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)
