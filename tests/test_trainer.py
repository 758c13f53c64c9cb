"""The shared trainer: loss falls, exact resume, frozen base, data errors, schedule."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_folder

import llama_adapter as la
from llama_adapter.data import DataConfig, encode_pair, load_source
from llama_adapter.data.tokenize import IGNORE
from llama_adapter.train import TrainConfig, Trainer
from llama_adapter.train.schedule import lr_at

PAIRS = [("what colour is the circle?", "the circle is red"), ("what colour is the square?", "the square is blue"),
         ("what colour is the triangle?", "the triangle is green"), ("say hello", "hello world"),
         ("count to three", "one two three"), ("say yes", "yes")]


def examples(tok, n_copies=2):
    return [encode_pair(tok, p, r, 64, f"pair{i}") for _ in range(n_copies) for i, (p, r) in enumerate(PAIRS)]


def v1_model(folder, seed=0):
    torch.manual_seed(seed)
    model, tok = la.load_pretrained(folder)
    la.attach(model, la.AdapterV1Config(prompt_len=8, n_layers=3))
    return model, tok


def config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), max_steps=40, batch_size=4, lr=3e-2, warmup_steps=3,
                progress=False, seed=0, threads=None)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def expressive_folder(tmp_path):
    """A tiny model with larger weights: with the usual 0.02 init its outputs are near uniform
    whatever its hidden states, so no adapter could move the loss much."""
    return save_tiny_folder(tmp_path / "expressive", initializer_range=0.2)


def test_training_drives_loss_down_and_only_adapter_moves(expressive_folder, tmp_path):
    model, tok = v1_model(expressive_folder)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = examples(tok)
    trainer = Trainer(model, config(tmp_path, max_steps=150, lr=0.1), {"instruction": data}, data[:6],
                      pad_id=tok.pad_id)
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.val_loss < 0.2 * before, (before, result.val_loss)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 151))
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_resume_reproduces_uninterrupted_losses(tiny_folder, tmp_path):
    tok = la.load_pretrained(tiny_folder)[1]
    data = examples(tok)

    model, _ = v1_model(tiny_folder)
    full = Trainer(model, config(tmp_path / "a", max_steps=12), {"instruction": data}, pad_id=tok.pad_id)
    assert full.fit().start_step == 0
    losses_full = [r["loss"] for r in full.log.records() if "loss" in r]

    model, _ = v1_model(tiny_folder)
    first = Trainer(model, config(tmp_path / "b", max_steps=12), {"instruction": data}, pad_id=tok.pad_id)
    torch.manual_seed(0)
    for _ in range(5):
        first.log.write(first.train_step())
    first.save()
    for _ in range(2):  # steps done after the checkpoint, lost when the run is killed
        first.log.write(first.train_step())

    model, _ = v1_model(tiny_folder, seed=123)  # different init: everything must come from the checkpoint
    resumed = Trainer(model, config(tmp_path / "b", max_steps=12), {"instruction": data}, pad_id=tok.pad_id)
    assert resumed.fit().start_step == 5
    losses_resumed = [r["loss"] for r in resumed.log.records() if "loss" in r]
    assert len(losses_resumed) == 12
    assert losses_resumed[5:] == pytest.approx(losses_full[5:], rel=0, abs=1e-6)

    model, _ = v1_model(tiny_folder)  # a fresh run in the same folder logs only its own steps
    fresh = Trainer(model, config(tmp_path / "b", max_steps=4, resume=False), {"instruction": data}, pad_id=tok.pad_id)
    fresh.fit()
    assert [r["step"] for r in fresh.log.records() if "loss" in r] == [1, 2, 3, 4]


def test_resume_refuses_other_training_data(tiny_folder, tmp_path):
    tok = la.load_pretrained(tiny_folder)[1]
    data = examples(tok)
    model, _ = v1_model(tiny_folder)
    Trainer(model, config(tmp_path, max_steps=3), {"instruction": data}, pad_id=tok.pad_id).fit()
    saved = {n: p.detach().clone() for n, p in la.trainable_parameters(model).items()}

    edited = data[:-1] + [encode_pair(tok, "say no", "no", 64, "edited")]
    for other, said in ((edited, "the same count but other content"), (data[:-2], "12 examples then, 10 examples now")):
        model, _ = v1_model(tiny_folder, seed=1)
        trainer = Trainer(model, config(tmp_path, max_steps=6), {"instruction": other}, pad_id=tok.pad_id)
        with pytest.raises(ValueError, match=said) as err:
            trainer.fit()
        assert "checkpoint-0000003" in str(err.value) and "'instruction'" in str(err.value)
        assert not any(torch.equal(p, saved[n]) for n, p in la.trainable_parameters(model).items()
                       if p.abs().sum() > 0)  # refused before loading anything
    model, _ = v1_model(tiny_folder, seed=1)
    resumed = Trainer(model, config(tmp_path, max_steps=6), {"instruction": examples(tok)}, pad_id=tok.pad_id)
    assert resumed.fit().steps == 6


def test_gradient_accumulation_equals_bigger_batch(tiny_folder, tmp_path):
    tok = la.load_pretrained(tiny_folder)[1]
    data = examples(tok)
    grads = []
    for bs, acc in ((4, 1), (2, 2)):
        model, _ = v1_model(tiny_folder)
        for p in la.trainable_parameters(model).values():
            if p.dim() == 1:
                torch.nn.init.normal_(p)
        t = Trainer(model, config(tmp_path / f"g{bs}", batch_size=bs, grad_accum=acc, clip_grad=None),
                    {"instruction": data}, pad_id=tok.pad_id)
        t.samplers["instruction"].batch_size = bs
        captured: dict[str, torch.Tensor] = {}

        def capture(t=t, captured=captured):
            captured.update({n: p.grad.clone() for n, p in t.params.items()})

        t.optimizer.step = capture
        t.train_step()
        grads.append(captured)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_bf16_autocast_keeps_trainable_fp32(tiny_folder, tmp_path):
    model, tok = v1_model(tiny_folder)
    data = examples(tok)
    trainer = Trainer(model, config(tmp_path, max_steps=3, precision="bf16", base_dtype="bf16"),
                      {"instruction": data}, pad_id=tok.pad_id)
    trainer.fit()
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in la.trainable_parameters(model).values())
    with pytest.raises(ValueError, match="base_dtype bf16 needs bf16 autocast"):
        Trainer(model, config(tmp_path, base_dtype="bf16"), {"instruction": data}, pad_id=tok.pad_id)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                         (False, False, None)])
def test_auto_precision_takes_bf16_only_where_the_cpu_has_it(monkeypatch, amx, avx512_bf16, expected):
    """Training's precision "auto" and the model dtype "auto" (the server's default) make the same choice."""
    from llama_adapter.device import resolve_dtype, resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("bf16", cpu) == torch.bfloat16 and resolve_precision("fp32", cpu) is None
    assert resolve_dtype("auto", cpu) == (expected or torch.float32)


def test_labels_cover_only_the_response(tiny):
    _, tok = tiny
    ex = encode_pair(tok, "say hello", "hello world", 64, "x")
    n_prompt = len(tok.encode("say hello"))
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.labels[-1] == tok.hf.eos_token_id


def test_record_whose_prompt_fills_context_is_reported_by_index(tiny, tmp_path):
    _, tok = tiny
    path = tmp_path / "data.json"
    records = [{"instruction": "say hello", "input": "", "output": "hello"},
               {"instruction": "the quick brown fox " * 30, "input": "", "output": "x"}]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"data.json#1: the prompt alone is \d+ tokens"):
        load_source(DataConfig(train=str(path), max_len=64), tok)
    train, _ = load_source(DataConfig(train=str(path), max_len=64, on_long_prompt="skip"), tok)
    assert len(train) == 1


def test_bad_records_name_file_and_index(tiny, tmp_path):
    _, tok = tiny
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(ValueError, match=r"record 1 of .*bad.jsonl has no string field 'output'"):
        load_source(DataConfig(train=str(path)), tok)
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_source(DataConfig(train=str(path)), tok)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_source(DataConfig(train=str(tmp_path / "nothere.json")), tok)


def test_warmup_then_half_cosine():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, floor=0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_gates_and_vectors():
    from llama_adapter.train.optim import decays

    assert decays("layers.3.self_attn.prefix.prompt", torch.zeros(4, 4))
    assert not decays("layers.3.self_attn.prefix.gate", torch.zeros(4))
    assert not decays("layers.3.mlp.up_proj.delta_bias", torch.zeros(4))


def test_paper_lr_rule():
    assert TrainConfig(batch_size=4, grad_accum=8, base_lr=9e-3).learning_rate(world_size=2) == pytest.approx(
        9e-3 * 64 / 256)


def test_a_groups_lr_scale_multiplies_its_learning_rate_at_every_step(tiny_folder, tmp_path):
    model, tok = v1_model(tiny_folder)
    gates = [n for n in model.adapter.groups["adapter"] if n.endswith("gate")]
    model.adapter.groups = {"prompts": [n for n in model.adapter.groups["adapter"] if n not in gates], "gates": gates}
    model.adapter.lr_scale = {"gates": 0.25}
    trainer = Trainer(model, config(tmp_path, max_steps=5), {"instruction": examples(tok)}, pad_id=tok.pad_id)
    params = la.trainable_parameters(model)
    for step in range(3):
        trainer.train_step()
        want = lr_at(step, 5, 3, 3e-2)
        for g in trainer.optimizer.param_groups:
            names = {n for n, p in params.items() if any(p is q for q in g["params"])}
            scale = 0.25 if names <= set(gates) else 1.0
            assert names <= set(gates) or not names & set(gates)  # a group never mixes scales
            assert g["lr"] == pytest.approx(want * scale)
