"""Inference fast paths: the opt-in compiled decode step and the fused q/k/v and gate/up
projections compute what the plain eager model computes, and step aside whenever the model is
not plain."""

from __future__ import annotations

import torch
from conftest import save_tiny_folder

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


def joint_groups(model):
    from llama_adapter.model.fused import GROUPS, _joint_of

    return [_joint_of([getattr(getattr(layer, parent), n) for n in names])
            for layer in model.layers for parent, names in GROUPS]


def test_fused_projections_share_storage_and_compute_what_the_separate_linears_do(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from llama_adapter.methods.export import export_folded
    from llama_adapter.model.fused import fuse_projections

    model, tok = la.load_pretrained(tiny_folder)
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        separate = model(ids)
        fuse_projections(model)
        assert all(g is not None for g in joint_groups(model))
        attn = model.layers[0].self_attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
        assert torch.allclose(model(ids), separate, atol=1e-5, rtol=0)
        # Writes into the parameters (load_state_dict copies in place) reach the joint tensor.
        other, _ = la.load_pretrained(save_tiny_folder(tmp_path / "other", seed=1))
        model.load_state_dict(other.state_dict())
        assert all(g is not None for g in joint_groups(model))
        assert torch.allclose(model(ids), other(ids), atol=1e-5, rtol=0)

    # An adapter whose linears are not plain (scales, biases, LoRA) takes the separate path ...
    twin, _ = la.load_pretrained(save_tiny_folder(tmp_path / "twin", seed=1))
    for m in (model, twin):
        la.attach(m, la.AdapterV2Config(n_layers=0, lora_rank=2))
    with torch.no_grad():
        for a, b in zip(la.trainable_parameters(model).values(), la.trainable_parameters(twin).values()):
            a.add_(torch.randn_like(a) * 0.1)
            b.copy_(a)
        assert torch.allclose(model(ids), twin(ids), atol=1e-5, rtol=0)
        # ... and folding replaces the weights, so the stale joint tensors are dropped and rebuilt.
        la.fold(model)
        la.fold(twin)
        assert torch.allclose(model(ids), twin(ids), atol=1e-5, rtol=0)
    assert all(g is None for g in joint_groups(model))
    assert tokens(model, tok, ["the quick brown fox"]) == tokens(twin, tok, ["the quick brown fox"])
    assert all(g is not None for g in joint_groups(model))

    # Fused under generate's inference mode, the weights still serve training ...
    plain, _ = la.load_pretrained(tiny_folder)
    tokens(plain, tok, ["hello"])
    la.attach(plain, la.AdapterV1Config(prompt_len=3, n_layers=2))
    loss = plain(ids).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in la.trainable_parameters(plain).values())
    # ... and export writes the views as tensors of their own, which transformers loads.
    out = export_folded(plain, tok, tmp_path / "exported")
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, separate, atol=1e-5, rtol=0)
