"""model/attention.py: the causal attention of compiled CPU training steps (flash forward, written-out backward)
computes SDPA's values and gradients, and is used only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_adapter.model import attention
from llama_adapter.model.attention import _FlashForwardFusedBackward, _fused_backward_applies, causal_attention


def qkv(dtype: torch.dtype, B: int = 2, H: int = 6, G: int = 2, T: int = 19, d: int = 16):
    g = torch.Generator().manual_seed(0)
    make = lambda heads: torch.randn(B, heads, T, d, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(H), make(G), make(G), torch.randn(B, H, T, d, generator=g).to(dtype)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def values_and_grads(fn, q, k, v, d_out):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), d_out))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_values_and_gradients_equal_sdpa(dtype, tol):
    q, k, v, d_out = qkv(dtype)
    expected = values_and_grads(sdpa, q, k, v, d_out)
    for fn in (_FlashForwardFusedBackward.apply, torch.compile(causal_attention, fullgraph=True)):
        for name, got, want in zip(("out", "dq", "dk", "dv"), values_and_grads(fn, q, k, v, d_out), expected):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item(),
                                       msg=name)


def test_only_compiled_gradient_steps_on_a_cpu_use_it(monkeypatch):
    q, k, v, _ = qkv(torch.float32)
    decide = torch.compile(lambda q, k, v: torch.tensor(_fused_backward_applies(q, k, v)), fullgraph=True)
    assert bool(decide(q, k, v))
    assert not _fused_backward_applies(q, k, v)  # eagerly SDPA's kernel is faster
    with torch.no_grad():
        assert not bool(decide(q, k, v))  # no backward: SDPA
    torch._dynamo.reset()
    assert not bool(decide(q, k[:, :, :5], v[:, :, :5]))  # keys beyond the queries (a cache)
    monkeypatch.setattr(attention, "MAX_SCORES", q.shape[0] * q.shape[1] * q.shape[2] ** 2 - 1)
    torch._dynamo.reset()
    assert not bool(decide(q, k, v))  # too many scores to hold: the flash kernel's backward


def test_under_autocast_it_computes_in_autocasts_dtype_as_sdpa_does():
    q, k, v, d_out = qkv(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k16 = k * 1.0  # an fp32 key next to bf16 queries: SDPA casts both
        out = torch.compile(causal_attention, fullgraph=True)(q.bfloat16(), k16, v)
        want = sdpa(q.bfloat16(), k16, v)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
