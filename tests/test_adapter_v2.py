"""LLaMA-Adapter V2: bias/scale/norm tuning, LoRA, folding and export, early fusion, disjoint
parameter groups in joint training."""

from __future__ import annotations

import pytest
import torch

import llama_adapter as la
from llama_adapter.data.multimodal import collate_multimodal, encode_conversation, read_llava
from llama_adapter.data.synth import synthesize
from llama_adapter.data.tokenize import encode_pair
from llama_adapter.methods.export import export_folded
from llama_adapter.train import TrainConfig, Trainer


def perturb(model, scale=0.1):
    """Trained-looking values: non-trivial scales, biases, LoRA, norms, prompts and gates."""
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth"), 8, seed=5, n_test=2, ocr_words=1)


def test_init_equals_base_with_lora(tiny):
    model, _ = tiny
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        base = model(ids)
    la.attach(model, la.AdapterV2Config(prompt_len=4, n_layers=2, lora_rank=4))
    with torch.no_grad():
        assert torch.equal(model(ids), base)


def test_trainable_parameters_and_groups(tiny):
    model, _ = tiny
    cfg = model.config
    la.attach(model, la.AdapterV2Config(prompt_len=4, n_layers=2))
    outputs = cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim + 2 * cfg.dim + 2 * cfg.ffn_dim
    per_layer = 2 * outputs  # a scale and a bias per output channel of q, k, v, o, gate, up, down
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    prompts = 2 * (4 * cfg.dim + cfg.n_heads)
    assert la.count_trainable(model) == cfg.n_layers * per_layer + norms + prompts
    assert set(model.adapter.groups) == {"instruction"}


def test_visual_and_instruction_layers_never_overlap(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="E=2 \\+ n_layers L=3 exceeds the model's N=4 layers"):
        la.attach(model, la.AdapterV2Config(n_layers=3, vision="efficientnet-lite0", visual_layers=2))
    with pytest.raises(ValueError, match="visual_layers E=5 exceeds the model's N=4 layers"):
        la.AdapterV2Config(vision="x", visual_layers=5, n_layers=0).layer_split(4)
    early, late = la.AdapterV2Config(vision="x", visual_layers=1).layer_split(30)
    assert early == range(0, 1) and late == range(2, 30)


@pytest.mark.parametrize("visual_layers", [4, 5], ids=["E=N", "E>N"])
def test_default_instruction_layers_refuse_an_early_fusion_depth_that_leaves_none(tiny, visual_layers):
    model, _ = tiny
    cfg = la.AdapterV2Config(vision="efficientnet-lite0", visual_layers=visual_layers)
    with pytest.raises(ValueError, match=f"visual_layers E={visual_layers} ") as refused:
        la.attach(model, cfg)  # refused before the image encoder is loaded
    assert "N=4 layers" in str(refused.value) and "n_layers L" in str(refused.value)
    assert model.adapter is None


def test_valid_layer_splits(tiny):
    # default L: all layers above max(E, 2); an explicit L = 0 is bias tuning without instruction prompts
    assert la.AdapterV2Config(vision="x", visual_layers=3).layer_split(4) == (range(0, 3), range(3, 4))
    assert la.AdapterV2Config(vision="x", visual_layers=1).layer_split(4) == (range(0, 1), range(2, 4))
    assert la.AdapterV2Config(vision="x", visual_layers=4, n_layers=0).layer_split(4) == (range(0, 4), range(4, 4))
    assert la.AdapterV2Config().layer_split(4) == (range(0, 0), range(2, 4))
    # text only on two layers: none above the first two for the default L
    with pytest.raises(ValueError, match="E=0 .*N=2 layers.*L = 2 - max\\(E, 2\\) = 0"):
        la.AdapterV2Config().layer_split(2)
    model, _ = tiny
    la.attach(model, la.AdapterV2Config(prompt_len=2, vision="efficientnet-lite0", visual_layers=3,
                                        visual_queries=2, visual_blocks=1, visual_width=16))
    prefixed = [i for i, layer in enumerate(model.layers) if getattr(layer.self_attn, "prefix", None) is not None]
    assert prefixed == [0, 1, 2, 3]
    assert model.layers[3].self_attn.prefix.row_key is None and model.layers[2].self_attn.prefix.row_key is not None


def test_fold_keeps_logits(tiny):
    model, _ = tiny
    la.attach(model, la.AdapterV2Config(prompt_len=4, n_layers=2, lora_rank=4))
    perturb(model)
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        before = model(ids)
        la.fold(model)
        after = model(ids)
    assert (before - after).abs().max().item() < 1e-5
    assert not any(n.endswith((".scale", ".delta_bias")) or ".lora." in n for n, _ in model.named_parameters())
    assert set(la.trainable_parameters(model)) == {n for n, _ in model.named_parameters() if ".prefix." in n}
    assert model.adapter.config.bias_scale is False and model.adapter.config.lora_rank == 0


def test_export_without_prompts_loads_in_transformers_with_equal_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    la.attach(model, la.AdapterV2Config(n_layers=0, lora_rank=2))
    perturb(model)
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        expected = model(ids)
    out = export_folded(model, tok, tmp_path / "exported")
    assert not (out / "adapter").exists()
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(ref).__name__ == "LlamaForCausalLM"
    assert ref.config.attention_bias and ref.config.mlp_bias
    with torch.no_grad():
        assert (ref(ids).logits - expected).abs().max().item() < 1e-5
    ours, _ = la.load_pretrained(out)
    with torch.no_grad():
        assert (ours(ids) - expected).abs().max().item() < 1e-5


def test_export_with_prompts_writes_base_plus_prompt_adapter(tiny, tmp_path):
    model, tok = tiny
    la.attach(model, la.AdapterV2Config(prompt_len=4, n_layers=2))
    perturb(model)
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        expected = model(ids)
    out = export_folded(model, tok, tmp_path / "exported")
    reloaded, _ = la.load_pretrained(out)
    la.load_adapter(reloaded, out / "adapter")
    assert reloaded.adapter.config.bias_scale is False
    with torch.no_grad():
        assert (reloaded(ids) - expected).abs().max().item() < 1e-5


def test_export_cli(tiny_folder, tmp_path, capsys):
    from llama_adapter.cli import main

    model, _ = la.load_pretrained(tiny_folder)
    la.attach(model, la.AdapterV2Config(n_layers=0))
    perturb(model)
    la.save_adapter(model, tmp_path / "ad")
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "hf"), "--device", "cpu"]) == 0
    assert "exported a folded model" in capsys.readouterr().out
    ids = torch.randint(0, 400, (1, 10))
    exported, _ = la.load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert (exported(ids) - model(ids)).abs().max().item() < 1e-5


def v2_vision(folder, tmp_path, monkeypatch, **options):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    model, tok = la.load_pretrained(folder)
    la.attach(model, la.AdapterV2Config(prompt_len=4, n_layers=2, vision="efficientnet-lite0", visual_layers=1,
                                        visual_queries=3, visual_blocks=1, visual_width=32, **options))
    return model, tok


def test_visual_and_projector_lr_scales_apply_to_their_parameters_only(tiny_folder, tmp_path, monkeypatch):
    model, _ = v2_vision(tiny_folder, tmp_path, monkeypatch, visual_lr_scale=4.0, projector_lr_scale=0.25)
    scales = model.adapter.lr_scales()
    visual = model.adapter.groups["visual"]
    assert {scales[n] for n in visual if n.startswith("visual.proj.")} == {1.0}  # 4 x 0.25
    assert {scales[n] for n in visual if not n.startswith("visual.proj.")} == {4.0}  # prompts and gates
    assert {scales[n] for n in model.adapter.groups["instruction"]} == {1.0}
    for bad in ({"visual_lr_scale": 0.0}, {"projector_lr_scale": -1.0}):
        with pytest.raises(ValueError, match="multipliers must be > 0"):
            v2_vision(tiny_folder, tmp_path, monkeypatch, **bad)


def test_early_fusion_init_and_text_rows_untouched(tiny_folder, tmp_path, monkeypatch, synth):
    model, tok = v2_vision(tiny_folder, tmp_path, monkeypatch)
    base, _ = la.load_pretrained(tiny_folder)
    image = read_llava(synth.llava_test)[0].image
    prompts = ["what colour is the shape?"] * 2
    assert la.generate(model, tok, prompts, images=[image, None], max_new_tokens=4) == \
        la.generate(base, tok, prompts, max_new_tokens=4)
    assert model.layers[0].self_attn.prefix.row_key == "visual_rows"
    assert model.layers[1].self_attn.prefix is None  # E + L = 3 < 4: layer 1 has neither
    perturb(model)  # now only the visual prefix of layer 0 differs between the two rows
    ids = torch.tensor([tok.encode("what colour is the shape?")] * 2)
    prep = model.adapter.prepare_inputs(model, ids, torch.ones_like(ids), [image, None])
    with torch.no_grad():
        both = model(ids, extras=prep.extras)
        text_only = model(ids[1:])
    assert torch.allclose(both[1:], text_only, atol=1e-5)  # the text row ignores the visual prefix
    assert not torch.allclose(both[:1], text_only, atol=1e-3)


def test_caption_steps_never_move_instruction_parameters_and_vice_versa(tiny_folder, tmp_path, monkeypatch, synth):
    model, tok = v2_vision(tiny_folder, tmp_path, monkeypatch)
    perturb(model, 0.05)  # non-zero gates, so every parameter gets a gradient
    captions = [encode_conversation(tok, c, 96, "plain", kind="caption") for c in read_llava(synth.llava_train)]
    text = [encode_pair(tok, "say hello", "hello world", 64, f"t{i}") for i in range(8)]
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=40, batch_size=2, lr=1e-2, weight_decay=0.5,
                      mix={"caption": 0.5, "instruction": 0.5}, progress=False)
    trainer = Trainer(model, cfg, {"caption": captions, "instruction": text},
                      collate_fn=lambda ex: collate_multimodal(ex, tok.pad_id))
    groups = {g: set(ns) for g, ns in model.adapter.groups.items()}
    params = la.trainable_parameters(model)
    seen = set()
    for _ in range(12):
        kind = trainer.kind_for_step(trainer.step)
        before = {n: p.detach().clone() for n, p in params.items()}
        trainer.train_step()
        trained = "visual" if kind == "caption" else "instruction"
        other = "instruction" if trained == "visual" else "visual"
        for n in groups[other]:
            assert torch.equal(params[n], before[n]), (kind, n)
        assert all(not torch.equal(params[n], before[n]) for n in groups[trained]), kind
        seen.add(kind)
    assert seen == {"caption", "instruction"}  # both kinds ran, each after the other had momentum


def test_visual_prefix_is_scaled_to_its_layer_inputs_and_the_scale_is_saved(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    model, _ = la.load_pretrained(tiny_folder)
    weight = model.layers[0].input_layernorm.weight
    with torch.no_grad():  # a layer whose normalised inputs are small, like SmolLM2's layer 0
        weight.copy_(torch.linspace(0.01, 0.09, weight.numel()))
    la.attach(model, la.AdapterV2Config(prompt_len=4, n_layers=2, vision="efficientnet-lite0", visual_queries=3,
                                        visual_blocks=1, visual_width=32))
    prefix = model.layers[0].self_attn.prefix
    assert prefix.input_scale.item() == pytest.approx(weight.pow(2).mean().sqrt().item())
    assert prefix.input_scale.item() < 0.1
    assert model.layers[-1].self_attn.prefix.input_scale.item() == 1.0  # instruction prompts: unscaled
    la.save_adapter(model, tmp_path / "adapter")
    folded_base, _ = la.load_pretrained(tiny_folder)  # its layer-0 norm differs, as after folding trained norms
    la.load_adapter(folded_base, tmp_path / "adapter")
    assert folded_base.layers[0].self_attn.prefix.input_scale.item() == pytest.approx(prefix.input_scale.item())
    fixed, _ = v2_vision(tiny_folder, tmp_path, monkeypatch, visual_prompt_scale=0.5)
    assert fixed.layers[0].self_attn.prefix.input_scale.item() == 0.5
    with pytest.raises(ValueError, match="visual_prompt_scale must be > 0"):
        la.AdapterV2Config(vision="efficientnet-lite0", visual_prompt_scale=0.0)
