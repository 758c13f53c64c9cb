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

import torch
from torch import nn

from .encoders import VisionFeatures

VARIANCE_FLOOR = 1e-4  # channels that never vary stay near zero instead of blowing up
CLIP = 10.0  # standardised values are clipped: an image unlike the training set cannot dominate


class _RunningMoments(nn.Module):
    """Count, mean and sum of squared deviations of [N, D] rows, merged batch by batch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        x = rows.detach().to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
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

    def forward(self, feats: VisionFeatures) -> VisionFeatures:
        """Update the statistics with these images in a training step, then standardise them."""
        if self.training and torch.is_grad_enabled():
            for moments, g in zip(self.globals, feats.globals):
                moments.update(g)
            self.tokens.update(feats.tokens.flatten(0, 1))
        return VisionFeatures([m.standardize(g) for m, g in zip(self.globals, feats.globals)],
                              self.tokens.standardize(feats.tokens))
