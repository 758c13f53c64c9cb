"""Export of a folded model: the folder loads in transformers and in our loader with the adapted
model's logits, keeps the base model's attention layout (sliding window included), and leaves
the model it was given untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import save_tiny_folder

import llama_adapter as la
from llama_adapter.methods.export import export_folded

WINDOW = 8


def perturb(model, scale=0.1):
    """Trained-looking values: non-trivial scales, biases, LoRA, norms, prompts and gates."""
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * scale)


@pytest.fixture
def tiny_mistral(tmp_path):
    return la.load_pretrained(save_tiny_folder(tmp_path / "mistral", "mistral", sliding_window=WINDOW))


@pytest.mark.parametrize("prompts", [0, 2], ids=["bias-tuning-only", "with-prompts"])
def test_export_keeps_the_sliding_window(tiny_mistral, tmp_path, prompts):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_mistral
    torch.manual_seed(0)
    la.attach(model, la.AdapterV2Config(prompt_len=3, n_layers=prompts, lora_rank=2))
    perturb(model)
    ids = torch.randint(0, 400, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids)
        unwindowed = copy.deepcopy(model)
        unwindowed.config.sliding_window = None
        # the window matters here: without it the logits after position WINDOW are different
        assert (unwindowed(ids)[:, WINDOW:] - expected[:, WINDOW:]).abs().max().item() > 1e-3

    out = export_folded(model, tok, tmp_path / "exported")

    ours, _ = la.load_pretrained(out)
    if prompts:
        la.load_adapter(ours, out / "adapter")
    with torch.no_grad():
        assert (ours(ids) - expected).abs().max().item() < 1e-5
    assert ours.config.sliding_window == WINDOW
    if not prompts:  # transformers knows nothing of the prompts: it can only load the folded base
        ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            assert (ref(ids).logits - expected).abs().max().item() < 1e-5


def test_export_leaves_the_model_untouched(tiny_mistral, tmp_path):
    model, tok = tiny_mistral
    la.attach(model, la.AdapterV2Config(prompt_len=3, n_layers=2, lora_rank=2))
    perturb(model)
    config_before = copy.deepcopy(model.config)
    adapter_config_before = copy.deepcopy(model.adapter.config)
    trainable_before = {n: p.detach().clone() for n, p in la.trainable_parameters(model).items()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 400, (1, 2 * WINDOW), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids)

    export_folded(model, tok, tmp_path / "exported")

    assert model.config == config_before
    assert model.adapter.config == adapter_config_before
    assert getattr(model, "name_or_path", None) != str(tmp_path / "exported")
    after = la.trainable_parameters(model)
    assert after.keys() == trainable_before.keys()  # scales, biases and LoRA are still there, unfolded
    assert all(torch.equal(after[n], t) for n, t in trainable_before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    with torch.no_grad():
        assert torch.equal(model(ids), expected)


def test_smollm3_layouts_that_the_model_cannot_run_are_refused():
    from llama_adapter.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=400, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, qkv_bias=True,
                      o_bias=True, mlp_bias=True, sliding_window=WINDOW, model_type="smollm3")
    hf = cfg.to_hf()
    assert ModelConfig.from_hf(hf) == cfg
    with pytest.raises(ValueError, match="no_rope_layers"):
        ModelConfig.from_hf({**hf, "no_rope_layers": [1, 1, 1, 0]})
    with pytest.raises(ValueError, match="mixed attention layer types"):
        ModelConfig.from_hf({**hf, "layer_types": ["sliding_attention", "full_attention"] * 2})
