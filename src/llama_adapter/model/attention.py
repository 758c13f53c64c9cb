"""Causal self-attention whose backward the compiled training step fuses (on a CPU).

Why: in the compiled training step on a CPU, PyTorch's flash attention kernel spent a quarter of the step in
its backward (SmolLM2, 4 x 256 tokens: 7.9 ms a layer, 5.4x its forward). Here the forward is still that
kernel, and the backward is written out: the probabilities recomputed from the forward's log-sum-exp, five
batched matrix products and the pointwise work between them, which inductor fuses into a few loops.

The backward holds one layer's scores [B, H, T, T] in fp32 at a time (9.4 MB at 4 x 256 tokens, 9 heads),
so longer sequences keep the flash kernel's backward (`MAX_SCORES`). Eagerly the written-out backward is
slower than the kernel's (its pointwise steps each pass over the scores), so it is used only while compiling.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Above this many score elements (B * H * T * T) for one layer, the flash kernel's own backward: 64M fp32 is
# 256 MB of scores and as much again of their gradient.
MAX_SCORES = 64 * 2**20


class _FlashForwardFusedBackward(torch.autograd.Function):
    """Causal attention of q [B, H, T, d] over k, v [B, G, T, d] (H a multiple of G)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rep = q.shape[1] // k.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)  # keys and values of their own heads: expanded again below
        ctx.rep = rep
        return out

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        k, v = k.repeat_interleave(ctx.rep, 1), v.repeat_interleave(ctx.rep, 1)
        B, H, T, d = q.shape
        scale = d ** -0.5
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        probs = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(future, 0.0)
        d_v = torch.matmul(probs.to(q.dtype).transpose(-1, -2), d_out)
        d_probs = torch.matmul(d_out, v.transpose(-1, -2)).float()
        row_dot = (d_out.float() * out.float()).sum(-1, keepdim=True)
        d_scores = (probs * (d_probs - row_dot) * scale).to(q.dtype)
        d_q = torch.matmul(d_scores, k)
        d_k = torch.matmul(d_scores.transpose(-1, -2), q)
        groups = H // ctx.rep
        return (d_q, d_k.view(B, groups, ctx.rep, T, d).sum(2), d_v.view(B, groups, ctx.rep, T, d).sum(2))


def _fused_backward_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (torch.compiler.is_compiling() and torch.is_grad_enabled() and q.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16)
            and q.shape[-2] == k.shape[-2] and q.shape[0] * q.shape[1] * q.shape[-2] * k.shape[-2] <= MAX_SCORES)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for q [B, H, T, d] and k, v [B, G, T, d]: SDPA's value, with a
    backward that a compiled CPU training step fuses."""
    if torch.is_autocast_enabled(q.device.type):  # SDPA computes in autocast's dtype: so does the kernel here
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if _fused_backward_applies(q, k, v):
        return _FlashForwardFusedBackward.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
