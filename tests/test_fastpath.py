"""The opt-in compiled decode step: the same tokens and logits as the eager path, and a clean
fallback to eager whenever the model is not plain."""

from __future__ import annotations

import torch

import llama_adapter as la
from llama_adapter.generate import Sampling, generate_tokens
from llama_adapter.model.fastpath import compiled_decode_of


def tokens(model, tok, prompts, n=10):
    ids = [tok.encode(p) for p in prompts]
    return [t.tolist() for t in generate_tokens(model, tok, ids, Sampling(max_new_tokens=n))]


def test_compiled_decode_matches_eager_and_steps_aside_for_adapters(tiny_folder):
    eager, tok = la.load_pretrained(tiny_folder)
    fast, _ = la.load_pretrained(tiny_folder)
    state = la.enable_compiled_decode(fast)
    prompts = ["the quick brown fox", "hello"]  # different lengths: left padding, masked keys
    assert tokens(fast, tok, prompts) == tokens(eager, tok, prompts)
    assert state.failed is None and state.compiled_steps > 0

    la.attach(fast, la.AdapterV1Config(prompt_len=3, n_layers=2))
    la.attach(eager, la.AdapterV1Config(prompt_len=3, n_layers=2))
    with torch.no_grad():
        for a, b in zip(la.trainable_parameters(fast).values(), la.trainable_parameters(eager).values()):
            a.normal_()
            b.copy_(a)
    before = state.compiled_steps
    assert tokens(fast, tok, prompts) == tokens(eager, tok, prompts)
    assert compiled_decode_of(fast).compiled_steps == before  # the adapted model decoded eagerly


def test_folded_v2_model_uses_the_compiled_step(tiny_folder):
    eager, tok = la.load_pretrained(tiny_folder)
    la.attach(eager, la.AdapterV2Config(n_layers=0, lora_rank=2))
    with torch.no_grad():
        for p in la.trainable_parameters(eager).values():
            p.add_(torch.randn_like(p) * 0.1)
    la.fold(eager)
    eager.adapter = None
    state = la.enable_compiled_decode(eager)
    with_graph = tokens(eager, tok, ["the lazy dog"])
    assert state.compiled_steps > 0
    la.disable_compiled_decode(eager)
    assert tokens(eager, tok, ["the lazy dog"]) == with_graph


def test_head_in_pieces_equals_one_linear(monkeypatch):
    from llama_adapter.model import fastpath

    monkeypatch.setattr(fastpath, "HEAD_ROWS_PER_PIECE", 7)  # 30 rows: pieces of 7, 7, 7, 7, 2
    gen = torch.Generator().manual_seed(0)
    x, norm = torch.randn(2, 16, generator=gen), torch.randn(16, generator=gen)
    w, b = torch.randn(30, 16, generator=gen), torch.randn(30, generator=gen)
    for bias in (None, b):
        want = torch.nn.functional.linear(fastpath._rms(x, norm, 1e-5), w, bias)
        got = fastpath._head_step(x, norm, 1e-5, w, bias, use_gemv=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
