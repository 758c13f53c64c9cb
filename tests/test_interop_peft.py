"""PEFT round trips on the embedded SmolLM2: PEFT's AdaptionPrompt and LoRA models against ours, both ways."""

from __future__ import annotations

import pytest
import torch

import llama_adapter as la
from llama_adapter import interop
from llama_adapter.model.load import resolve_model_path

peft = pytest.importorskip("peft")
IDS = torch.tensor([[1, 504, 3103, 314, 260, 1789, 30, 2016, 28, 4472, 253, 1115]])


def hf_base():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(resolve_model_path("smollm2-135m")), dtype=torch.float32).eval()


def ours():
    model, _ = la.load_pretrained("smollm2-135m")
    return model


def peft_logits(pm) -> torch.Tensor:
    with torch.no_grad():
        return pm(input_ids=IDS).logits


def our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_peft_adaption_prompt_loads_with_peft_logits(tmp_path, capsys):
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_base(), peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=6,
                                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("adaption_gate"):
                p.copy_(torch.randn(1) * 0.5)
            elif name.endswith("adaption_prompt"):
                p.copy_(torch.randn_like(p) * 0.1)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    want = peft_logits(pm)
    model = ours()
    base = our_logits(model)
    assert interop.detect_format(tmp_path / "peft") == "peft-prompt"
    with pytest.warns(UserWarning, match="scalar"):
        interop.load_adapter(model, tmp_path / "peft")
    assert model.adapter.config.gate == "scalar" and model.adapter.config.n_layers == 6
    got = our_logits(model)
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output, so the comparison means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # the command line takes the PEFT folder too (its base model from base_model_name_or_path)
    from llama_adapter.cli import main

    tok = la.load_pretrained("smollm2-135m")[1]
    assert main(["generate", "--adapter", str(tmp_path / "peft"), "--prompt", "Hello", "--no-chat",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == la.generate(model, tok, ["Hello"], max_new_tokens=3)[0] + "\n"


def test_our_scalar_gate_v1_saved_as_peft_loads_in_peft(tmp_path):
    torch.manual_seed(1)
    model = ours()
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=5, gate="scalar"))
    with torch.no_grad():
        for name, p in la.trainable_parameters(model).items():
            p.copy_(torch.randn_like(p) * (0.5 if name.endswith("gate") else 0.1))
    want = our_logits(model)
    interop.save_adapter(model, tmp_path / "v1peft", format="peft")
    pm = peft.PeftModel.from_pretrained(hf_base(), str(tmp_path / "v1peft")).eval()
    torch.testing.assert_close(peft_logits(pm), want, atol=1e-4, rtol=1e-4)


def test_peft_lora_loads_with_peft_logits(tmp_path):
    torch.manual_seed(2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(hf_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "lora"))
    want = peft_logits(pm)
    model = ours()
    interop.load_adapter(model, tmp_path / "lora")
    cfg = model.adapter.config
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.bias_scale, cfg.norms) == (4, 8.0, False, False)
    torch.testing.assert_close(our_logits(model), want, atol=1e-4, rtol=1e-4)


def test_our_lora_only_v2_saved_as_peft_loads_in_peft(tmp_path):
    torch.manual_seed(3)
    model = ours()
    la.attach(model, la.AdapterV2Config(n_layers=0, bias_scale=False, norms=False, lora_rank=3, lora_alpha=6.0,
                                        lora_targets=("q_proj", "v_proj", "down_proj")))
    with torch.no_grad():
        for name, p in la.trainable_parameters(model).items():
            if name.endswith("lora.B"):
                p.copy_(torch.randn_like(p) * 0.05)
    want = our_logits(model)
    interop.save_adapter(model, tmp_path / "v2peft", format="peft")
    pm = peft.PeftModel.from_pretrained(hf_base(), str(tmp_path / "v2peft")).eval()
    got = peft_logits(pm)
    assert (got - our_logits(ours())).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_peft_export_refuses_what_peft_cannot_hold(tmp_path):
    model = ours()
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2))  # per-head tanh gates: no PEFT equivalent
    with pytest.raises(ValueError, match="one scalar gate without tanh"):
        interop.save_adapter(model, tmp_path / "x", format="peft")
    model = ours()
    la.attach(model, la.AdapterV2Config(n_layers=0, lora_rank=2))  # bias tuning too
    with pytest.raises(ValueError, match="also has bias_scale, norms"):
        interop.save_adapter(model, tmp_path / "y", format="peft")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
