"""Rotary position embeddings (plain, linear-scaled and Llama-3 frequency-band scaled)."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """fp32 rotary inverse frequencies [head_dim / 2], with linear or Llama-3 scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    sc = cfg.rope_scaling
    if sc.rope_type == "linear":
        inv = inv / sc.factor
    elif sc.rope_type == "llama3":
        low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
        high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
            sc.high_freq_factor - sc.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv / sc.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        scaled = torch.where(mid, (1 - smooth) * inv / sc.factor + smooth * inv, scaled)
        inv = scaled
    return inv.float()


class Rotary(torch.nn.Module):
    """Holds a cos/sin table that grows on demand; indexed by explicit positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # A plain attribute, not a buffer: it must stay fp32 when the model is cast to bf16.
        self.inv_freq = inverse_frequencies(cfg)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin [>= n, head_dim] for positions 0..n-1."""
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != device:
            size = max(n, 256, 0 if self._cos is None else 2 * self._cos.shape[0])
            t = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        assert self._sin is not None  # set together with _cos
        return self._cos, self._sin

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, head_dim] in `dtype`."""
        cos, sin = self.table(int(positions.max()) + 1, positions.device)
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dimension's halves (the rotary pairing of HF checkpoints)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x by the position angles whose cos and sin are given."""
    return x * cos + rotate_half(x) * sin
