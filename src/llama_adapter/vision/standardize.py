"""Per-channel standardisation of a frozen encoder's features, from running statistics.

CNN stage outputs are unbounded and, for images that look alike, dominated by what all
images share: on the synthetic shapes set only 5-11% of an early EfficientNet stage's
energy varies between images once each vector is LayerNorm-ed, and that part carries
colour. Subtracting the per-channel mean and dividing by the per-channel spread over the
training images makes the differences the signal; a projector trained on them learns
colour several times faster. The statistics are exact running moments (Chan's merge, in
float64) of every image seen in training steps (training mode with gradients on; inference
under no_grad never moves them), and they are saved with the adapter, so a trained model
behaves the same after reloading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from .features import VisionFeatures

VARIANCE_FLOOR = 1e-4  # channels that never vary stay near zero instead of blowing up
CLIP = 10.0  # standardised values are clipped: an image unlike the training set cannot dominate


def _rank_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of a torchrun job (identity in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class _RunningMoments(nn.Module):
    """Count, mean and sum of squared deviations of [N, D] rows, merged batch by batch."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Merge the batch's rows; in a torchrun job the batch is the global one (every rank's rows,
        so that all ranks keep the same statistics, equal to one process's on the whole batch)."""
        x = rows.detach().to(torch.float64)
        head = _rank_sum(torch.cat([x.new_full((1,), x.shape[0]), x.sum(0)]))
        n_b = float(head[0])
        if n_b == 0:
            return
        mean_b = head[1:] / n_b
        m2_b = _rank_sum(((x - mean_b) ** 2).sum(0))
        n_a = self.count.clone()
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta**2 * (n_a * n_b / n)
        self.count.fill_(n)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised x; x unchanged before any statistics (a `where`, not a host sync per forward)."""
        var = self.m2 / (self.count - 1).clamp_min(1)
        mean = self.mean.to(x.dtype)
        scale = (var + VARIANCE_FLOOR).rsqrt().to(x.dtype)
        return torch.where(self.count > 0, ((x - mean) * scale).clamp(-CLIP, CLIP), x)


class FeatureStandardizer(nn.Module):
    """Standardises every global tap per channel, and the token grid per channel (over images and positions)."""

    def __init__(self, global_dims: Sequence[int], token_dim: int) -> None:
        super().__init__()
        self.globals = nn.ModuleList([_RunningMoments(d) for d in global_dims])
        self.tokens = _RunningMoments(token_dim)

    def _global_moments(self) -> list[_RunningMoments]:
        """The per-tap statistics (typed: nn.ModuleList yields plain Modules to a type checker)."""
        return cast(list[_RunningMoments], list(self.globals))

    def observe_no_images(self) -> None:
        """A training batch without images: in a torchrun job this rank still takes its part in merging
        the batch statistics over the ranks (its peers may have images), with zero rows."""
        if self.training and torch.is_grad_enabled():
            for moments in [*self._global_moments(), self.tokens]:
                moments.update(moments.mean.new_zeros((0, moments.mean.numel())))

    def forward(self, feats: VisionFeatures) -> VisionFeatures:
        """Update the statistics with these images in a training step, then standardise them."""
        if self.training and torch.is_grad_enabled():
            for moments, g in zip(self._global_moments(), feats.globals):
                moments.update(g)
            self.tokens.update(feats.tokens.flatten(0, 1))
        return VisionFeatures([m.standardize(g) for m, g in zip(self._global_moments(), feats.globals)],
                              self.tokens.standardize(feats.tokens))
