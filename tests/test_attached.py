"""The attached method is the one place that answers questions about an attached model, and the
trainer needs nothing of a method beyond the small interface of model/attached.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama_adapter as la
from llama_adapter.data import encode_pair
from llama_adapter.model.attached import TrainableAdapter, method_is_plain, prepares_inputs, takes_images
from llama_adapter.train import TrainConfig, Trainer


def test_questions_about_an_attached_model(tiny):
    model, tok = tiny
    assert (takes_images(model), prepares_inputs(model), method_is_plain(model)) == (False, False, True)
    la.attach(model, la.AdapterV1Config(prompt_len=2, n_layers=1))
    a = model.adapter
    assert (a.takes_images, a.prepares_inputs, a.plain) == (False, False, False)
    assert not method_is_plain(model)


def test_a_folded_v2_without_prompts_is_plain_again(tiny):
    model, tok = tiny
    la.attach(model, la.AdapterV2Config(n_layers=0))
    assert not model.adapter.plain and not method_is_plain(model)
    la.fold(model)
    assert model.adapter.plain and method_is_plain(model)


def test_attached_refuses_half_an_input_layout():
    from llama_adapter.methods.registry import Attached

    with pytest.raises(ValueError, match="come together"):
        Attached("x", None, groups={}, prepare_inputs=lambda *a: None)
    with pytest.raises(ValueError, match="takes images must prepare"):
        Attached("x", None, groups={}, images=True)


class NormTuning:
    """A method the registry has never heard of: it trains the final norm's weight. Only the trainer's
    interface (TrainableAdapter) is implemented, so the trainer cannot be relying on anything else."""

    method, config, kind_groups = "norm_tuning", None, {}
    prepare_inputs = prepare_batch = None
    prepares_inputs = takes_images = plain = False

    def __init__(self) -> None:
        self.groups = {"norm": ["norm.weight"]}
        self.saved: list[Path] = []

    def lr_scales(self) -> dict[str, float]:
        return {}

    def trainable_parameters(self, model):
        return {"norm.weight": model.norm.weight}

    def save(self, model, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"norm.weight": model.norm.weight.detach().contiguous()}, str(folder / "norm.safetensors"))
        self.saved.append(folder)
        return folder

    def load(self, model, folder) -> None:
        with torch.no_grad():
            model.norm.weight.copy_(load_file(str(Path(folder) / "norm.safetensors"))["norm.weight"])


def test_the_trainer_trains_any_trainable_adapter(tiny, tmp_path):
    model, tok = tiny
    adapter: TrainableAdapter = NormTuning()
    model.requires_grad_(False)
    model.norm.weight.requires_grad_(True)
    model.adapter = adapter
    data = [encode_pair(tok, "say hello", "hello world", 32, f"r{i}") for i in range(8)]
    before = model.norm.weight.detach().clone()
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=30, batch_size=4, lr=5e-2, warmup_steps=0,
                      save_every=10, progress=False)
    trainer = Trainer(model, cfg, {"instruction": data}, data[:4], pad_id=tok.pad_id)
    start = trainer.evaluate()
    result = trainer.fit()
    assert result.val_loss < start
    assert not torch.equal(model.norm.weight, before)
    # periodic checkpoints and the final adapter went through the method's own save
    # periodic checkpoints (written in a temporary folder, then renamed) and the final adapter went through
    # the method's own save
    assert [p.name.split(".")[1] for p in adapter.saved[:-1]] == [f"checkpoint-{s:07d}" for s in (10, 20, 30)]
    assert adapter.saved[-1] == tmp_path / "run"
    final = load_file(str(tmp_path / "run" / "norm.safetensors"))["norm.weight"]
    torch.testing.assert_close(final, model.norm.weight.detach())
    # resuming loads the checkpoint through the method's own load
    with torch.no_grad():
        model.norm.weight.zero_()
    resumed = Trainer(model, cfg, {"instruction": data}, data[:4], pad_id=tok.pad_id).fit()
    assert resumed.start_step == 30
    torch.testing.assert_close(model.norm.weight.detach(), final)
