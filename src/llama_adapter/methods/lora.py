"""Low-rank updates on a linear layer: y += (alpha / r) * B A x, B zero-initialised."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 device: torch.device | str | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.to(x.dtype).T @ self.B.to(x.dtype).T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * self.scaling
