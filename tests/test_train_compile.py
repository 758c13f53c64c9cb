"""train.compile: the compiled training step learns what the eager one does, saves the same adapter, and a
failure to compile falls back to eager; the option is validated."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import save_tiny_folder
from PIL import Image
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import llama_adapter as la
from llama_adapter.batch import IGNORE, Example
from llama_adapter.data.multimodal import MultimodalExample, collate_multimodal
from llama_adapter.recipe import load_recipe
from llama_adapter.train import TrainConfig, Trainer

STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("compile") / "tiny")


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """One block with a prompt: one forward and one backward graph, so that compiling stays short (several
    block layouts sharing graphs: the slow test below)."""
    return save_tiny_folder(tmp_path_factory.mktemp("compile1") / "tiny", num_hidden_layers=1)


def fixed_length_examples(n: int = 8, length: int = 24, seed: int = 0) -> list[Example]:
    """Rows of one length, so that every batch has the same shape (one graph per block layout)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 400, (length,), generator=g).tolist()
        prompt = 8 + i % 5
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:], f"row{i}"))
    return out


def train(folder, out_dir, compile: bool | str, data, n_layers: int = 4, **kw):
    torch.manual_seed(0)
    model, _ = la.load_pretrained(folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=n_layers))
    with torch.no_grad():  # open the zero-initialised gates, so that the prompts act from the first step
        for n, p in la.trainable_parameters(model).items():
            if n.endswith("gate"):
                p.fill_(0.5)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    settings = dict(max_steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, seed=0) | kw
    cfg = TrainConfig(out_dir=str(out_dir), compile=compile, **settings)
    trainer = Trainer(model, cfg, {"instruction": data}, pad_id=0)
    trainer.fit()
    losses = [r["loss"] for r in trainer.log.records() if "loss" in r]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} moved"
    return trainer, losses, {n: p.detach().clone() for n, p in la.trainable_parameters(model).items()}


def test_compiled_step_matches_eager_and_saves_the_same_adapter(one_layer, tmp_path):
    folder = one_layer
    torch._dynamo.reset()
    data = fixed_length_examples()
    _, eager_losses, eager_weights = train(folder, tmp_path / "eager", False, data, n_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn: the test must compile
        trainer, losses, weights = train(folder, tmp_path / "compiled", True, data, n_layers=1)
    assert trainer.compiled is not None and trainer.compiled.enabled and trainer.compiled.compile_seconds
    assert len(losses) == STEPS
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    assert weights.keys() == eager_weights.keys()
    for n, w in weights.items():
        torch.testing.assert_close(w, eager_weights[n], rtol=1e-4, atol=1e-6, msg=n)
    assert max(abs(a - b) for a, b in zip(losses, losses[1:])) > 0  # it trained

    # the adapter and the checkpoint hold the same tensor names; the adapter loads into a fresh model
    saved = load_file(tmp_path / "compiled" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "eager" / "adapter_model.safetensors").keys()
    last = tmp_path / "compiled" / f"checkpoint-{STEPS:07d}" / "adapter_model.safetensors"
    assert load_file(last).keys() == saved.keys()
    model, _ = la.load_pretrained(folder)
    la.load_adapter(model, tmp_path / "compiled")
    for n, p in la.trainable_parameters(model).items():
        torch.testing.assert_close(p.detach(), weights[n], rtol=0, atol=0, msg=n)
    # blocks are left as they were: nothing shadows their forward after training
    assert all("forward" not in vars(b) for b in trainer.model.layers)


def test_the_compiled_step_computes_its_loss_with_the_compiled_cross_entropy(one_layer):
    """Inside a compiled step `lm_loss` takes the compiled cross-entropy (fused kernels), outside the eager one;
    both give the same loss and the same gradient of the logits."""
    from llama_adapter import loss
    from llama_adapter.train.compiled import CompiledBlocks

    model, _ = la.load_pretrained(one_layer)
    compiled = CompiledBlocks(model)
    assert loss._cross_entropy.get() is loss.summed_cross_entropy
    with compiled.active():
        assert loss._cross_entropy.get() is compiled._loss
    assert loss._cross_entropy.get() is loss.summed_cross_entropy
    g = torch.Generator().manual_seed(0)
    results = []
    for n in (7, 13):  # label counts vary between batches
        targets = torch.randint(0, 400, (n,), generator=g)
        logits = (torch.randn(n, 400, generator=g) * 3).bfloat16()
        for fn in (loss.summed_cross_entropy, compiled._loss):
            x = logits.clone().requires_grad_()
            value = fn(x, targets)
            value.backward()
            results.append((value.detach(), x.grad))
        (eager_value, eager_grad), (value, grad) = results[-2:]
        torch.testing.assert_close(value, eager_value, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-3)  # bf16 gradients


@pytest.mark.slow
def test_compiled_step_with_varying_lengths_bf16_and_checkpointing(folder, tmp_path):
    """Blocks with and without a prompt sharing graphs, batches of several lengths (a recompile with a
    dynamic length), bf16 autocast with activation checkpointing and gradient accumulation: the eager
    run's losses and weights."""
    torch._dynamo.reset()
    data = [ex for length in (20, 24, 31) for ex in fixed_length_examples(4, length, seed=length)]
    fp32 = {"n_layers": 3, "batch_size": 1, "max_steps": 6}  # one row a step: the batch length changes
    bf16 = {"precision": "bf16", "activation_checkpointing": True, "grad_accum": 2}
    for kw in (fp32, bf16):
        tag = "fp32" if kw is fp32 else "bf16"
        counters.clear()
        _, eager_losses, eager_weights = train(folder, tmp_path / f"eager-{tag}", False, data, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            trainer, losses, weights = train(folder, tmp_path / f"compiled-{tag}", True, data, **kw)
        assert trainer.compiled is not None and trainer.compiled.enabled
        assert not counters["graph_break"], dict(counters["graph_break"])
        if kw is fp32:  # (no prompt, prompt) x (input without, with gradient), then a dynamic length
            assert counters["stats"]["unique_graphs"] > 3
            assert losses == pytest.approx(eager_losses, rel=1e-5)
            for n, w in weights.items():
                torch.testing.assert_close(w, eager_weights[n], rtol=1e-4, atol=1e-6, msg=n)
        else:  # bf16: fused casts round differently; Adam turns tiny gradient differences into up to a step (lr)
            assert losses == pytest.approx(eager_losses, rel=1e-3)
            for n, w in weights.items():
                torch.testing.assert_close(w, eager_weights[n], rtol=0.05, atol=2e-2, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lavin", "v1"])
def test_compiled_multimodal_step_matches_eager(folder, tmp_path, method):
    """LaVIN's adapters use dropout in training: the compiled step draws the eager masks (fallback_random),
    so its losses are the eager run's, with images and without; V1 multimodal's prompts carry each example's
    visual features into the blocks (train.compile: auto compiles the long runs of its recipe)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    clip = tmp_path / "clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(str(clip))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip))
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(2):
        pictures.append(tmp_path / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(pictures[-1])

    def run(compile: bool) -> list[float]:
        torch.manual_seed(0)
        model, tok = la.load_pretrained(folder)
        if method == "lavin":
            la.attach(model, la.LavinConfig(vision=f"clip:{clip}", dropout=0.5), tokenizer=tok)
        else:
            la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2, vision=f"clip:{clip}"), tokenizer=tok)
        answer = tok.encode(" red circle", add_special_tokens=False) + [2]
        examples = []
        for i, text in enumerate(["what colour is it?", "what shape is it?", "hello world", "how are you today?"]):
            p = tok.encode(text)
            examples.append(MultimodalExample(p + answer, [IGNORE] * len(p) + answer, pictures[i] if i < 2 else None,
                                              f"r{i}"))
        cfg = TrainConfig(out_dir=str(tmp_path / f"run-{compile}"), max_steps=STEPS, batch_size=4,
                          lr=1e-2 if method == "lavin" else 1e-1, progress=False, compile=compile)
        trainer = Trainer(model, cfg, {"vqa": examples}, collate_fn=lambda ex: collate_multimodal(ex, tok.pad_id))
        trainer.fit()
        assert compile is (trainer.compiled is not None and trainer.compiled.enabled)
        return [r["loss"] for r in trainer.log.records() if "loss" in r]

    eager = run(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = run(True)
    assert len(set(eager)) == STEPS  # it trained
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_a_failed_compile_warns_once_and_trains_eagerly(folder, tmp_path):
    data = fixed_length_examples()
    _, eager_losses, eager_weights = train(folder, tmp_path / "eager", False, data)

    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    torch.manual_seed(0)
    model, _ = la.load_pretrained(folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=4))
    with torch.no_grad():
        for n, p in la.trainable_parameters(model).items():
            if n.endswith("gate"):
                p.fill_(0.5)
    cfg = TrainConfig(out_dir=str(tmp_path / "broken"), max_steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=0,
                      progress=False, seed=0, compile=True)
    trainer = Trainer(model, cfg, {"instruction": data}, pad_id=0)
    assert trainer.compiled is not None
    trainer.compiled._fn = broken
    with pytest.warns(RuntimeWarning, match="compiling the training step failed.*no C\\+\\+ compiler") as record:
        trainer.fit()
    assert len([w for w in record if "train.compile" in str(w.message)]) == 1
    assert len(calls) == 1 and not trainer.compiled.enabled
    losses = [r["loss"] for r in trainer.log.records() if "loss" in r]
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for n, p in la.trainable_parameters(model).items():
        torch.testing.assert_close(p.detach(), eager_weights[n], rtol=1e-6, atol=1e-7, msg=n)
    assert all("forward" not in vars(b) for b in model.layers)


def test_an_error_of_the_step_itself_is_raised_not_blamed_on_compiling(folder, tmp_path):
    torch.manual_seed(0)
    model, _ = la.load_pretrained(folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=4))

    def bad_loss(model, batch):
        raise ValueError("a bad batch")

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, progress=False, compile=True)
    trainer = Trainer(model, cfg, {"instruction": fixed_length_examples()}, pad_id=0, loss_fn=bad_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="a bad batch"):
            trainer.train_step()
    assert trainer.compiled is not None and trainer.compiled.enabled


def test_compile_option_is_validated_and_set_from_recipes():
    assert TrainConfig().compile == "auto"
    assert load_recipe(None, ["train.compile=true"]).train.compile is True
    assert load_recipe(None, ["train.compile=false"]).train.compile is False
    assert load_recipe(None, ["train.compile=auto"]).train.compile == "auto"
    for bad in ("maybe", "1"):
        with pytest.raises(ValueError, match="compile must be true, false or auto"):
            load_recipe(None, [f"train.compile={bad}"])
    with pytest.raises(ValueError, match="compile must be true, false or auto"):
        TrainConfig(compile="yes")
    with pytest.raises(ValueError, match="unknown key.*compiled"):
        load_recipe(None, ["train.compiled=true"])


def test_auto_compiles_after_a_few_eager_steps_only_where_the_rest_of_the_run_pays_for_it(one_layer, tmp_path,
                                                                                          monkeypatch):
    """train.compile: auto (the default): the first steps run eagerly; then the blocks are compiled if what the
    remaining steps would save exceeds a cold compile's wait."""
    from llama_adapter.train import trainer as trainer_module
    from llama_adapter.train.compiled import AUTO_EAGER_STEPS, compile_pays_off

    assert not compile_pays_off(0.29, 156)  # the demo: 160 steps of about 0.29 s stay eager
    assert compile_pays_off(1.0, 1400)  # the synthetic-images recipe: 1,400 steps of about 1 s compile
    torch._dynamo.reset()
    data = fixed_length_examples()
    steps = AUTO_EAGER_STEPS + 2
    short, eager_losses, eager_weights = train(one_layer, tmp_path / "short", "auto", data, n_layers=1,
                                               max_steps=steps)
    assert short.compiled is None  # 2 steps left pay for nothing
    monkeypatch.setattr(trainer_module, "compile_pays_off", lambda seconds, left: left > 0)  # as a long run would
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn: the test must compile
        long, losses, weights = train(one_layer, tmp_path / "long", "auto", data, n_layers=1, max_steps=steps)
    assert long.compiled is not None and long.compiled.enabled and long.compiled.compile_seconds
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)  # eager steps, then compiled ones
    for n, w in weights.items():
        torch.testing.assert_close(w, eager_weights[n], rtol=1e-4, atol=1e-6, msg=n)
