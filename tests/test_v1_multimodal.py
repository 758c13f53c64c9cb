"""V1 multimodal: the projected visual token added to every adapted prompt, with the real
embedded EfficientNet-Lite0 encoder on a tiny random language model."""

from __future__ import annotations

import pytest
import torch

import llama_adapter as la
from llama_adapter.data.multimodal import collate_multimodal, encode_conversation, read_llava
from llama_adapter.data.synth import synthesize
from llama_adapter.train import TrainConfig, Trainer
from llama_adapter.vision import blank_image


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth"), 12, seed=3, n_test=4, ocr_words=2)


def mm_model(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    model, tok = la.load_pretrained(folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2, vision="efficientnet-lite0"))
    return model, tok


def test_init_equals_base_with_and_without_images(tiny_folder, tmp_path, monkeypatch, synth):
    base, tok = la.load_pretrained(tiny_folder)
    model, _ = mm_model(tiny_folder, tmp_path, monkeypatch)
    prompts = ["what colour is the shape?"] * 2
    images = [read_llava(synth.llava_test)[0].image, None]
    assert la.generate(model, tok, prompts, images=images, max_new_tokens=5) == \
        la.generate(base, tok, prompts, max_new_tokens=5)


def test_trainable_are_prompts_gates_and_projector_only(tiny_folder, tmp_path, monkeypatch):
    model, _ = mm_model(tiny_folder, tmp_path, monkeypatch)
    names = set(la.trainable_parameters(model))
    assert {n for n in names if n.startswith("visual.proj.")} and not any("frontend" in n for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("visual.frontend"))
    proj = model.visual["proj"]
    assert la.count_trainable(model) == 2 * (4 * 64 + 4) + sum(p.numel() for p in proj.parameters())


def test_training_moves_projector_and_the_model_then_looks(tiny_folder, tmp_path, monkeypatch, synth):
    model, tok = mm_model(tiny_folder, tmp_path, monkeypatch)
    records = read_llava(synth.llava_train)
    examples = [encode_conversation(tok, r, 128, "chat") for r in records]
    before = {n: p.detach().clone() for n, p in la.trainable_parameters(model).items()}
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=4, batch_size=4, lr=1e-2, progress=False)
    Trainer(model, cfg, {"vqa": examples}, collate_fn=lambda ex: collate_multimodal(ex, tok.pad_id)).fit()
    moved = {n for n, p in la.trainable_parameters(model).items() if not torch.equal(p, before[n])}
    assert moved == set(before)  # prompts, gates and the projector all trained
    # the feature cache now holds every training image
    assert model.visual["frontend"]._cache.misses == len({r.image for r in records})
    # and the frontend's running statistics have seen each image of the 4 steps of 4
    assert model.visual["frontend"].standardizer.globals[0].count.item() == 4 * 4
    # with trained (non-zero) gates the image changes the prompt keys, so the logits
    ids = torch.tensor([tok.encode("what colour is the shape?")])
    prep = model.adapter.prepare_inputs
    with torch.no_grad():
        with_image = model(ids, extras=prep(model, ids, torch.ones_like(ids), [records[0].image]).extras)
        blank = model(ids, extras=prep(model, ids, torch.ones_like(ids), [blank_image()]).extras)
    assert not torch.allclose(with_image, blank)


def test_a_bf16_base_trains_with_the_encoder_kept_fp32(tiny_folder, tmp_path, monkeypatch, synth):
    """base_dtype bf16 stores the language model's weights in bf16; the image encoder, whose batch-norm
    statistics are fp32 buffers, keeps its dtype (casting its weights alone failed in the first step)."""
    model, tok = mm_model(tiny_folder, tmp_path, monkeypatch)
    examples = [encode_conversation(tok, r, 128, "chat") for r in read_llava(synth.llava_train)]
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, lr=1e-2, progress=False,
                      precision="bf16", base_dtype="bf16")
    result = Trainer(model, cfg, {"vqa": examples}, collate_fn=lambda ex: collate_multimodal(ex, tok.pad_id)).fit()
    assert result.train_loss is not None and result.train_loss == result.train_loss  # finite, not NaN
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.visual.parameters())
    assert all(p.dtype == torch.float32 for p in la.trainable_parameters(model).values())


def test_feature_statistics_are_saved_and_reloaded(tiny_folder, tmp_path, monkeypatch, synth):
    model, tok = mm_model(tiny_folder, tmp_path, monkeypatch)
    images = [r.image for r in read_llava(synth.llava_train)][:4]
    frontend = model.visual["frontend"].train()
    frontend.features(images, 4, model.device)
    la.save_adapter(model, tmp_path / "ad")
    model2, _ = la.load_pretrained(tiny_folder)
    la.load_adapter(model2, tmp_path / "ad")
    a, b = (m.visual["frontend"].standardizer for m in (model, model2))
    assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers())) and a.tokens.count.item() == 4 * 49
    # eval mode uses them and does not move them
    model2.eval()
    feats, _ = model2.visual["frontend"].features(images, 4, model.device)
    assert b.globals[0].count.item() == 4
    assert torch.allclose(feats.globals[1].mean(0), torch.zeros(feats.globals[1].shape[-1]), atol=1e-4)


def test_save_load_round_trip_multimodal(tiny_folder, tmp_path, monkeypatch, synth):
    model, tok = mm_model(tiny_folder, tmp_path, monkeypatch)
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    la.save_adapter(model, tmp_path / "ad")
    model2, _ = la.load_pretrained(tiny_folder)
    la.load_adapter(model2, tmp_path / "ad")
    image = read_llava(synth.llava_test)[0].image
    a = la.generate(model, tok, ["what shape is it?"], images=[image], max_new_tokens=6)
    b = la.generate(model2, tok, ["what shape is it?"], images=[image], max_new_tokens=6)
    assert a == b


def test_images_on_a_text_only_adapter_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="no visual adapter"):
        la.generate(model, tok, ["hi"], images=[blank_image()])


def test_visual_norm_gives_the_token_the_prompts_scale(tiny_folder, tmp_path, monkeypatch, synth):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    model, _ = la.load_pretrained(tiny_folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2, vision="efficientnet-lite0", visual_norm=True))
    images = [r.image for r in read_llava(synth.llava_test)][:3]
    token = model.adapter.prepare_inputs(model, torch.zeros(3, 1, dtype=torch.long), None, images).extras
    token = token["visual_global"]
    assert token.shape == (3, 64)
    assert torch.allclose(token.std(-1, unbiased=False), torch.ones(3), atol=1e-2)  # LayerNorm (less its eps)
    assert "visual.proj.out_norm.weight" in la.trainable_parameters(model)
