"""Trainable maps from frozen image features to language-model-width visual tokens.

One per method: V1 squeezes the multi-scale globals into one token added to its prompts, V2
mixes learnable queries with the encoder's token grid, LaVIN's neck turns each tapped [CLS]
into a token of its own. All are plain fp32 modules that can be built on the meta device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .features import VisionFeatures

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


def _globals_of(x: VisionFeatures | Sequence[torch.Tensor], dims: Sequence[int], who: str) -> list[torch.Tensor]:
    feats = list(x.globals if isinstance(x, VisionFeatures) else x)
    got = [g.shape[-1] for g in feats]
    if got != list(dims):
        raise ValueError(f"{who} expects global features of widths {list(dims)}, got {got}")
    return feats


class GlobalMLPProjector(nn.Module):
    """V1 multimodal: concatenated multi-scale globals -> Linear -> GELU -> Linear -> one [B, out_dim] token.

    With `input_norm` each global first gets its own LayerNorm, because the scales of different
    layers/stages differ by orders of magnitude (CNN stage outputs are unbounded) and the
    widest one would otherwise dominate the concatenation. With `output_norm` a final LayerNorm
    gives the token the scale of the N(0, 1) adaption prompts it is added to (as the reference's
    projection norm does); without it the visual part starts far smaller than the prompts.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, hidden: int = 256, input_norm: bool = True,
                 output_norm: bool = False) -> None:
        super().__init__()
        if not in_dims or min(in_dims) < 1 or out_dim < 1 or hidden < 1:
            raise ValueError(f"GlobalMLPProjector needs positive sizes, got in_dims={list(in_dims)}, "
                             f"out_dim={out_dim}, hidden={hidden}")
        self.in_dims = [int(d) for d in in_dims]
        self.out_dim = out_dim
        self.norms = nn.ModuleList([nn.LayerNorm(d) for d in self.in_dims]) if input_norm else None
        self.fc1 = nn.Linear(sum(self.in_dims), hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)
        self.out_norm = nn.LayerNorm(out_dim) if output_norm else None

    def forward(self, features: VisionFeatures | Sequence[torch.Tensor]) -> torch.Tensor:
        """The globals (a VisionFeatures or a list of [B, D_i]) -> one visual token [B, out_dim]."""
        feats = _globals_of(features, self.in_dims, "GlobalMLPProjector")
        if self.norms is not None:
            feats = [norm(g) for norm, g in zip(self.norms, feats)]
        out = self.fc2(self.act(self.fc1(torch.cat(feats, dim=-1))))
        return out if self.out_norm is None else self.out_norm(out)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class QueryBlock(nn.Module):
    """Pre-norm transformer block (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), as in V2's release."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N, dim]: pre-norm self-attention, then a pre-norm MLP, each residual."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def grid_position_embedding(n_tokens: int, width: int, device: torch.device | str | None = None,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding [n_tokens, width] of a square grid (1-D when N is not a square).

    Half the channels encode the row, half the column, each as sines and cosines at geometric
    frequencies; values lie in [-1, 1], the scale of the LayerNorm-ed tokens they are added to.
    """
    side = math.isqrt(n_tokens)
    idx = torch.arange(n_tokens, device=device, dtype=torch.float32)
    coords = [idx // side, idx % side] if side * side == n_tokens else [idx]
    per_coord = width // (2 * len(coords))
    freqs = 10000.0 ** (-torch.arange(per_coord, device=device, dtype=torch.float32) / max(per_coord, 1))
    parts = []
    for c in coords:
        angles = c[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, width - emb.shape[1])).to(dtype or torch.float32)


class VisualQueryProjector(nn.Module):
    """V2: learnable queries mixed with the encoder's token grid; the query outputs become visual tokens.

    tokens [B, N, token_dim] -> Linear + LayerNorm (to `width`, default token_dim) + a fixed 2-D
    position embedding -> prepend n_queries learnable queries -> n_blocks QueryBlocks -> first
    n_queries -> Linear + LayerNorm -> [B, n_queries, out_dim]. Without the position embedding the
    blocks are blind to where a cell is (attention is permutation-invariant, and a CNN's cells
    carry little absolute position), so "which shape is left of which" could not be answered.
    A `width` below token_dim keeps the blocks small on wide CNN grids.
    """

    def __init__(self, token_dim: int, out_dim: int, n_queries: int = 10, n_blocks: int = 2,
                 n_heads: int | None = None, mlp_ratio: float = 4.0, width: int | None = None) -> None:
        super().__init__()
        width = token_dim if width is None else width
        n_heads = max(1, width // 64) if n_heads is None else n_heads
        if min(token_dim, out_dim, n_queries, width, n_heads) < 1 or n_blocks < 0:
            raise ValueError(f"VisualQueryProjector needs positive sizes, got token_dim={token_dim}, "
                             f"out_dim={out_dim}, n_queries={n_queries}, width={width}, n_heads={n_heads}")
        if width % n_heads:
            raise ValueError(f"VisualQueryProjector: width {width} is not divisible by n_heads {n_heads}")
        self.token_dim, self.out_dim, self.n_queries, self.width = token_dim, out_dim, n_queries, width
        self.in_proj = nn.Linear(token_dim, width)
        self.in_norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(n_queries, width) * 0.02)
        self.blocks = nn.ModuleList([QueryBlock(width, n_heads, mlp_ratio) for _ in range(n_blocks)])
        self.out_proj = nn.Linear(width, out_dim)
        self.out_norm = nn.LayerNorm(out_dim)

    def forward(self, features: VisionFeatures | torch.Tensor) -> torch.Tensor:
        """The token grid (a VisionFeatures or [B, N, token_dim]) -> visual tokens [B, n_queries, out_dim]."""
        tokens = features.tokens if isinstance(features, VisionFeatures) else features
        if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"VisualQueryProjector expects tokens [B, N, {self.token_dim}], got {tuple(tokens.shape)}")
        x = self.in_norm(self.in_proj(tokens))
        x = x + grid_position_embedding(x.shape[1], self.width, x.device, x.dtype)
        queries = self.queries.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([queries, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(self.out_proj(x[:, : self.n_queries]))


class ReleaseQueryProjector(nn.Module):
    """The LLaMA-Adapter V2 multimodal release's projector, module for module (its parameter names too).

    tokens [B, N, token_dim] (CLIP's projected tokens, [CLS] included) -> clip_proj (Linear) ->
    clip_proj_norm (LayerNorm) -> prepend the learnable `visual_query` rows -> `visual_blocks`
    (pre-norm QueryBlocks, no position embedding) -> first n_queries -> visual_proj (Linear) ->
    visual_proj_norm (LayerNorm) -> [B, n_queries, out_dim]. The release: 768 wide, 8 blocks of 16
    heads, 10 queries. Unlike VisualQueryProjector it adds no position embedding (CLIP's tokens carry
    their own).
    """

    def __init__(self, token_dim: int, out_dim: int, n_queries: int = 10, n_blocks: int = 8, n_heads: int = 16,
                 mlp_ratio: float = 4.0, width: int | None = None) -> None:
        super().__init__()
        width = token_dim if width is None else width
        if min(token_dim, out_dim, n_queries, width, n_heads) < 1 or n_blocks < 0 or width % n_heads:
            raise ValueError(f"ReleaseQueryProjector needs positive sizes and width divisible by n_heads, got "
                             f"token_dim={token_dim}, out_dim={out_dim}, n_queries={n_queries}, width={width}, "
                             f"n_heads={n_heads}")
        self.token_dim, self.n_queries = token_dim, n_queries
        self.clip_proj = nn.Linear(token_dim, width)
        self.clip_proj_norm = nn.LayerNorm(width)
        self.visual_query = nn.Embedding(n_queries, width)
        self.visual_blocks = nn.ModuleList([QueryBlock(width, n_heads, mlp_ratio) for _ in range(n_blocks)])
        self.visual_proj = nn.Linear(width, out_dim)
        self.visual_proj_norm = nn.LayerNorm(out_dim)

    def forward(self, features: VisionFeatures | torch.Tensor) -> torch.Tensor:
        """The token grid (a VisionFeatures or [B, N, token_dim]) -> visual tokens [B, n_queries, out_dim]."""
        tokens = features.tokens if isinstance(features, VisionFeatures) else features
        if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"ReleaseQueryProjector expects tokens [B, N, {self.token_dim}], "
                             f"got {tuple(tokens.shape)}")
        x = self.clip_proj_norm(self.clip_proj(tokens))
        queries = self.visual_query.weight.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([queries, x], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : self.n_queries]))


class LavinNeck(nn.Module):
    """LaVIN's visual neck: each tapped global [B, D_i] -> Linear(D_i, hidden) -> act -> Linear(hidden, out_dim).

    The two Linears are shared by all taps (one first Linear per distinct input width), which is
    what gives 659,584 parameters for CLIP ViT-L/14 (6 x 1024) into LLaMA-7B (4096). Output:
    [B, n_taps, out_dim], one visual token per tap. `activation=None` makes it purely linear.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, hidden: int = 128,
                 activation: str | None = "silu") -> None:
        super().__init__()
        if not in_dims or min(in_dims) < 1 or out_dim < 1 or hidden < 1:
            raise ValueError(f"LavinNeck needs positive sizes, got in_dims={list(in_dims)}, out_dim={out_dim}, "
                             f"hidden={hidden}")
        if activation is not None and activation not in _ACTIVATIONS:
            raise ValueError(f"LavinNeck activation must be one of {sorted(_ACTIVATIONS)} or None, got {activation!r}")
        self.in_dims = [int(d) for d in in_dims]
        self.out_dim = out_dim
        self.down = nn.ModuleDict({str(d): nn.Linear(d, hidden) for d in dict.fromkeys(self.in_dims)})
        self.act = _ACTIVATIONS[activation]() if activation else nn.Identity()
        self.up = nn.Linear(hidden, out_dim)

    def forward(self, features: VisionFeatures | Sequence[torch.Tensor]) -> torch.Tensor:
        """The globals (a VisionFeatures or a list of [B, D_i]) -> one visual token per tap [B, n_taps, out_dim]."""
        feats = _globals_of(features, self.in_dims, "LavinNeck")
        if len(self.down) == 1:
            hidden = next(iter(self.down.values()))(torch.stack(feats, dim=1))
        else:
            hidden = torch.stack([self.down[str(g.shape[-1])](g) for g in feats], dim=1)
        return self.up(self.act(hidden))
