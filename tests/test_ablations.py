"""The ablation options (docs/ablations.md): each changes what it says and nothing by default."""

from __future__ import annotations

import pytest
import torch

import llama_adapter as la
from llama_adapter.data.multimodal import collate_multimodal, encode_conversation, read_llava
from llama_adapter.data.tokenize import encode_pair
from llama_adapter.methods.lavin import LavinConfig
from llama_adapter.methods.prefix import RANDOM_INIT_GATE, GatedPrefix
from llama_adapter.train import TrainConfig, Trainer


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


# -- V1 / V2 init: zero | random -----------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda init: la.AdapterV1Config(prompt_len=4, n_layers=2, init=init),
                                  lambda init: la.AdapterV2Config(prompt_len=4, n_layers=2, init=init)])
def test_zero_init_is_the_base_model_and_random_init_is_not(tiny_folder, make):
    ids = torch.randint(0, 400, (2, 12))
    model, _ = la.load_pretrained(tiny_folder)
    base = logits(model, ids)
    la.attach(model, make("zero"))
    assert torch.equal(logits(model, ids), base)
    model, _ = la.load_pretrained(tiny_folder)
    la.attach(model, make("random"))
    gates = [p for n, p in la.trainable_parameters(model).items() if n.endswith("prefix.gate")]
    assert gates and all(torch.equal(g, torch.full_like(g, RANDOM_INIT_GATE)) for g in gates)
    assert (logits(model, ids) - base).abs().max() > 1e-3  # the prefix acts from step 0


def test_random_init_opens_every_gate_kind():
    for gate, value in [("per_head_tanh", 0.995), ("scalar_tanh", 0.995), ("per_head", 1.0), ("scalar", 1.0)]:
        prefix = GatedPrefix(3, 16, 4, gate, init="random")
        assert torch.allclose(prefix.gate_value(), torch.tensor(value), atol=1e-3), gate
        assert torch.equal(GatedPrefix(3, 16, 4, gate).gate_value(), torch.zeros_like(prefix.gate))


@pytest.mark.parametrize("bad, message", [({"init": "ones"}, "unknown init"), ({"prompt": "conv"}, "unknown prompt"),
                                          ({"prompt_hidden": 0}, "prompt_hidden")])
def test_bad_ablation_values_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        la.AdapterV1Config(**bad)


# -- V1 prompt: linear | mlp ------------------------------------------------------------------------

def test_mlp_prompts_start_as_the_base_model_and_train(tiny_folder):
    ids = torch.randint(0, 400, (2, 12))
    model, _ = la.load_pretrained(tiny_folder)
    base = logits(model, ids)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2, prompt="mlp", prompt_hidden=8))
    assert torch.equal(logits(model, ids), base)
    params = la.trainable_parameters(model)
    assert not any(n.endswith("prefix.prompt") for n in params)
    mlp = {n: p for n, p in params.items() if ".prompt_mlp." in n or n.endswith("prompt_seed")}
    assert len(mlp) == 2 * 5  # per layer: seed, two linears' weight and bias
    cfg = model.config
    assert la.count_trainable(model) == 2 * (4 * cfg.dim + (cfg.dim * 8 + 8) + (8 * cfg.dim + cfg.dim) + cfg.n_heads)
    opt = torch.optim.SGD(params.values(), lr=0.5)
    for step in range(2):  # step 0 moves only the gates (zero gates block the prompt's gradient), step 1 the MLP
        opt.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        moved = [n for n, p in mlp.items() if p.grad is not None and p.grad.abs().sum() > 0]
        assert (moved == []) if step == 0 else (sorted(moved) == sorted(mlp)), step
        opt.step()
    assert not torch.equal(logits(model, ids), base)


def test_mlp_prompt_keys_values_are_cached_at_inference_and_refreshed_after_a_step(tiny_folder):
    model, _ = la.load_pretrained(tiny_folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=1, prompt="mlp", prompt_hidden=8))
    prefix = model.layers[-1].self_attn.prefix
    with torch.no_grad():
        prefix.gate.fill_(0.5)
    ids = torch.randint(0, 400, (1, 8))
    calls = []
    original = prefix.prompt_mlp.forward
    prefix.prompt_mlp.forward = lambda x: calls.append(1) or original(x)
    first = logits(model, ids)
    logits(model, ids)
    assert len(calls) == 1  # the second pass reused the static keys/values
    with torch.no_grad():
        prefix.prompt_mlp[2].bias.add_(1.0)  # a training step changes the MLP: the cache must not be reused
    assert not torch.equal(logits(model, ids), first) and len(calls) == 2
    model(ids).sum().backward()  # with gradients: recomputed, never the cached copy
    assert len(calls) == 3 and prefix.prompt_seed.grad is not None


# -- LaVIN routing / modality token -------------------------------------------------------------------

def lavin(folder, **kw):
    model, tok = la.load_pretrained(folder)
    la.attach(model, LavinConfig(vision=None, dropout=0.0, **kw), tokenizer=tok)
    with torch.no_grad():  # trained-looking adapters: the routing matters once the up-projections are non-zero
        g = torch.Generator().manual_seed(0)
        for p in la.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


def lavin_out(model, tok):
    from llama_adapter.generate import left_pad

    ids, mask = left_pad([tok.encode(t) for t in ("hello world", "what colour is it?")], tok.pad_id,
                         torch.device("cpu"))
    with torch.no_grad():
        prep = model.adapter.prepare_inputs(model, ids, mask, None)
        out = model(inputs_embeds=prep.inputs_embeds, attention_mask=prep.attention_mask, extras=prep.extras)
    return prep, out[prep.attention_mask.bool()]


def test_routing_off_fixes_the_weights_and_trains_no_router(tiny_folder):
    model, tok = lavin(tiny_folder, routing=False)
    names = la.trainable_parameters(model)
    assert not any(".router." in n or ".up1." in n for n in names)
    adapter = model.layers[0].attn_adapter
    assert torch.equal(adapter.routing(torch.randn(3, model.config.dim)), torch.tensor([[1.0, 0.0]] * 3))
    _, before = lavin_out(model, tok)
    with torch.no_grad():
        model.lavin.modality.weight.add_(torch.randn_like(model.lavin.modality.weight))
        adapter.router.weight.add_(1.0)
    torch.testing.assert_close(lavin_out(model, tok)[1], before, rtol=0, atol=0)  # nothing reads a routing input
    routed, tok = lavin(tiny_folder)
    assert any(".router." in n for n in la.trainable_parameters(routed))
    w = routed.layers[0].attn_adapter.routing(torch.randn(3, routed.config.dim))
    assert not torch.allclose(w, torch.tensor([[1.0, 0.0]] * 3))


def test_modality_token_off_leaves_it_out_of_the_sequence(tiny_folder):
    with pytest.raises(ValueError, match="routing off too"):
        LavinConfig(vision=None, modality_token=False)
    with pytest.raises(ValueError, match="true or false"):
        LavinConfig(vision=None, routing="off")
    on, tok = lavin(tiny_folder, routing=False)
    off, _ = lavin(tiny_folder, routing=False, modality_token=False)
    assert not any("modality" in n for n in la.trainable_parameters(off))
    prep_on, out_on = lavin_out(on, tok)
    prep_off, out_off = lavin_out(off, tok)
    assert prep_off.inputs_embeds.shape[1] == prep_on.inputs_embeds.shape[1] - 1
    assert int(prep_off.attention_mask.sum()) == int(prep_on.attention_mask.sum())  # the token was masked anyway
    emb = off.lavin.modality.weight
    rows = prep_off.inputs_embeds.reshape(-1, emb.shape[1])
    assert not any(torch.equal(r, e) for r in rows for e in emb)
    # same adapters, same routing (fixed): the modality token was invisible, so the outputs are the same
    with torch.no_grad():
        for (n, p), q in zip(off.named_parameters(), on.parameters()):
            if "modality" not in n:
                p.copy_(q)
    torch.testing.assert_close(lavin_out(off, tok)[1], out_on, rtol=1e-5, atol=1e-5)
    batch = collate_multimodal([encode_pair(tok, "say hello", "hello world", 32, "t0")], tok.pad_id)
    inputs, labels = off.adapter.prepare_batch(off, batch)
    assert inputs["inputs_embeds"].shape[1] == labels.shape[1]
    assert inputs["attention_mask"][0, 0] == 1  # the first position is a real token, not a hidden modality token


# -- V2 joint: on | off ------------------------------------------------------------------------------

def test_joint_off_lets_a_caption_batch_move_the_instruction_group(tiny_folder, tmp_path, monkeypatch):
    from llama_adapter.data.synth import synthesize

    synth = synthesize(tmp_path / "synth", 4, seed=5, n_test=1, ocr_words=1)
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    moved = {}
    for joint in (True, False):
        model, tok = la.load_pretrained(tiny_folder)
        la.attach(model, la.AdapterV2Config(prompt_len=4, n_layers=2, vision="efficientnet-lite0", visual_layers=1,
                                            visual_queries=3, visual_blocks=1, visual_width=32, joint=joint))
        assert bool(model.adapter.kind_groups) == joint
        with torch.no_grad():  # non-zero gates, so every parameter gets a gradient
            for p in la.trainable_parameters(model).values():
                p.add_(torch.randn_like(p) * 0.05)
        captions = [encode_conversation(tok, c, 96, "plain", kind="caption") for c in read_llava(synth.llava_train)]
        cfg = TrainConfig(out_dir=str(tmp_path / f"run{joint}"), max_steps=2, batch_size=2, lr=1e-2, progress=False)
        pad = tok.pad_id
        trainer = Trainer(model, cfg, {"caption": captions},
                          collate_fn=lambda ex, pad=pad: collate_multimodal(ex, pad))
        params = la.trainable_parameters(model)
        before = {n: p.detach().clone() for n, p in params.items()}
        trainer.train_step()
        moved[joint] = {g: sum(not torch.equal(params[n], before[n]) for n in names)
                        for g, names in model.adapter.groups.items()}
    assert moved[True]["instruction"] == 0 and moved[True]["visual"] > 0
    assert moved[False]["instruction"] > 0 and moved[False]["visual"] > 0
