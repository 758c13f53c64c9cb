"""LLaMA-Adapter V1: the gated prefix attention against a plain reference, init, gradients."""

from __future__ import annotations

import math

import pytest
import torch

import llama_adapter as la
from llama_adapter.model.llama import ForwardContext
from llama_adapter.model.rope import apply_rotary


def test_init_logits_equal_base_exactly(tiny):
    model, _ = tiny
    ids = torch.randint(0, 400, (2, 20))
    with torch.no_grad():
        base = model(ids)
    la.attach(model, la.AdapterV1Config(prompt_len=5, n_layers=3))
    with torch.no_grad():
        adapted = model(ids)
    assert torch.equal(base, adapted)


def test_only_adapter_parameters_get_gradients_and_count_matches(tiny):
    model, _ = tiny
    cfg = model.config
    la.attach(model, la.AdapterV1Config(prompt_len=5, n_layers=3))
    for p in la.trainable_parameters(model).values():
        if p.dim() == 1:
            torch.nn.init.normal_(p)  # non-zero gates, so prompts get gradients too
    model(torch.randint(0, 400, (2, 12))).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == set(la.trainable_parameters(model))
    assert all(p.grad.abs().sum() > 0 for p in la.trainable_parameters(model).values())
    assert la.count_trainable(model) == 3 * (5 * cfg.dim + cfg.n_heads)


def test_default_layers_and_refusals(tiny):
    model, _ = tiny
    assert la.AdapterV1Config().adapted_layers(30) == range(2, 30)
    with pytest.raises(ValueError, match="n_layers=9 adapted layers, but the model has only 4"):
        la.attach(model, la.AdapterV1Config(n_layers=9))
    with pytest.raises(ValueError, match="unknown gate"):
        la.AdapterV1Config(gate="sigmoid")
    la.attach(model, la.AdapterV1Config(n_layers=2))
    with pytest.raises(ValueError, match="already attached"):
        la.attach(model, la.AdapterV1Config(n_layers=2))


def reference_attention(attn, prefix, x, cos, sin):
    """Explicit concatenation and two softmaxes, written from the paper's formula."""
    B, T, _ = x.shape
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, d).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, G, d).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, G, d).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    P = prefix.prompt
    kp = (P @ attn.k_proj.weight.T).view(1, -1, G, d).transpose(1, 2)
    vp = (P @ attn.v_proj.weight.T).view(1, -1, G, d).transpose(1, 2)
    rep = H // G
    k, v, kp, vp = (t.repeat_interleave(rep, dim=1) for t in (k, v, kp, vp))
    keys = torch.cat([kp.expand(B, -1, -1, -1), k], dim=2)  # [prompt ; text]
    values = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
    K = P.shape[0]
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s_text = scores[..., K:].masked_fill(~causal, float("-inf")).softmax(-1)
    s_prompt = scores[..., :K].softmax(-1)
    gate = torch.tanh(prefix.gate).view(1, H, 1, 1)
    out = s_text @ values[..., K:, :] + gate * (s_prompt @ values[..., :K, :])
    return out.transpose(1, 2).reshape(B, T, H * d) @ attn.o_proj.weight.T


def test_matches_plain_reference_with_gqa(tiny):
    model, _ = tiny
    assert model.config.n_kv_heads < model.config.n_heads
    la.attach(model, la.AdapterV1Config(prompt_len=6, n_layers=2))
    layer = model.layers[-1]
    attn, prefix = layer.self_attn, layer.self_attn.prefix
    with torch.no_grad():
        prefix.gate.normal_()
    x = torch.randn(2, 9, model.config.dim, requires_grad=True)
    cos, sin = model.rotary(torch.arange(9).expand(2, 9), x.dtype)

    ours = attn(x, cos, sin, None, True, ForwardContext(batch_size=2))
    g = torch.randn_like(ours)
    grads_ours = torch.autograd.grad((ours * g).sum(), [x, prefix.prompt, prefix.gate])
    ref = reference_attention(attn, prefix, x, cos, sin)
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, prefix.prompt, prefix.gate])
    assert (ours - ref).abs().max().item() < 1e-5
    for a, b in zip(grads_ours, grads_ref):
        assert (a - b).abs().max().item() < 1e-5
    assert grads_ours[1].abs().sum() > 0 and grads_ours[2].abs().sum() > 0


@pytest.mark.parametrize("gate", ["per_head", "scalar", "scalar_tanh"])
def test_compatibility_gates(tiny, gate):
    model, _ = tiny
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2, gate=gate))
    prefix = model.layers[-1].self_attn.prefix
    assert prefix.gate.shape == ((model.config.n_heads,) if gate == "per_head" else (1,))
    with torch.no_grad():
        prefix.gate.fill_(0.5)
    expected = 0.5 if gate in ("per_head", "scalar") else math.tanh(0.5)
    assert torch.allclose(prefix.gate_value(), torch.full_like(prefix.gate, expected))


def test_eval_pass_then_training_step_still_trains_every_prompt(tiny):
    """Regression for the stale prefix cache: a no-grad pass must not freeze the prompts."""
    model, _ = tiny
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=3))
    params = la.trainable_parameters(model)
    with torch.no_grad():
        for p in params.values():
            if p.dim() == 1:
                p.normal_()
    ids = torch.randint(0, 400, (2, 10))
    with torch.no_grad():
        before = model(ids)  # fills the static inference cache
    with torch.no_grad():  # an optimizer step changes the prompts
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)
        after = model(ids)
    assert not torch.equal(before, after), "the inference cache must follow parameter updates"
    model(ids).logsumexp(-1).sum().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_static_prompt_cache_used_in_inference(tiny):
    model, _ = tiny
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2))
    prefix = model.layers[-1].self_attn.prefix
    ids = torch.randint(0, 400, (1, 8))
    with torch.inference_mode():
        model(ids)
        first = prefix._static
        model(ids)
        assert prefix._static is first  # computed once, reused
    assert first[0].shape == (1, model.config.n_kv_heads, 4, model.config.head_dim)


def test_no_autograd_graph_below_lowest_adapted_layer(tiny):
    model, _ = tiny
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2))  # layers 2 and 3 of 4
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.requires_grad))
             for k, layer in enumerate(model.layers)]
    model(torch.randint(0, 400, (1, 8)))
    for h in hooks:
        h.remove()
    assert seen == {0: False, 1: False, 2: True, 3: True}


def test_cached_generation_equals_full_forward_with_adapter(tiny):
    model, tok = tiny
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=3))
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            if p.dim() == 1:
                p.normal_()
    from llama_adapter.generate import Sampling, generate_tokens

    prompt = tok.encode("the quick brown")
    seq = prompt + [int(t[0]) for t in generate_tokens(model, tok, [prompt], Sampling(max_new_tokens=8))]
    with torch.no_grad():
        full = model(torch.tensor([seq]))
    greedy = full[0, len(prompt) - 1: -1].argmax(-1).tolist()
    assert greedy == seq[len(prompt):]


def test_save_and_load_adapter_round_trip(tiny, tiny_folder, tmp_path):
    model, tok = tiny
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=3))
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.normal_()
    la.save_adapter(model, tmp_path / "ad")
    model2, _ = la.load_pretrained(tiny_folder)
    la.load_adapter(model2, tmp_path / "ad")
    ids = torch.randint(0, 400, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), model2(ids))
    import json

    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["method"] == "adapter_v1" and meta["base_model"] == str(tiny_folder)
    assert {k: meta["config"][k] for k in ("prompt_len", "n_layers", "gate", "vision")} == \
        {"prompt_len": 4, "n_layers": 3, "gate": "per_head_tanh", "vision": None}


def test_load_adapter_errors_name_the_problem(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        la.load_adapter(model, tmp_path / "missing")
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=3))
    la.save_adapter(model, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"garbage")
    model.adapter = None
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        la.load_adapter(model, tmp_path / "ad")


def test_inference_cache_does_not_leak_across_autocast(tiny):
    """K/V cached under bf16 autocast must not be reused in an fp32 pass (and vice versa)."""
    model, _ = tiny
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2))
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.normal_()
    ids = torch.randint(0, 400, (1, 8))
    fp32 = model(ids).detach()  # gradients on: computed afresh, no cache involved
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids)  # fills the inference cache with bf16 keys/values
        again = model(ids)
    assert again.dtype == torch.float32
    assert torch.allclose(fp32, again, atol=1e-6)
