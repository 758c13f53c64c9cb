"""Checksums on adapters and checkpoints: corrupt, truncated and replaced files are refused naming the file;
resume falls back to the newest checkpoint that verifies; old folders without checksums still load; an
adapter for another base model is refused before anything is attached."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import save_tiny_folder

import llama_adapter as la
from llama_adapter.checksum import MANIFEST, ChecksumError
from llama_adapter.data import encode_pair
from llama_adapter.methods.io import CONFIG, WEIGHTS
from llama_adapter.train import TrainConfig, Trainer
from llama_adapter.train.checkpoint import STATE

PAIRS = [("what colour is the circle?", "the circle is red"), ("say hello", "hello world"),
         ("count to three", "one two three"), ("say yes", "yes")]


def v1_model(folder, seed=0):
    torch.manual_seed(seed)
    model, tok = la.load_pretrained(folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2))
    return model, tok


def train(folder, out, max_steps=4, seed=0, resume=True):
    model, tok = v1_model(folder, seed)
    data = [encode_pair(tok, p, r, 64, f"pair{i}") for i, (p, r) in enumerate(PAIRS)]
    cfg = TrainConfig(out_dir=str(out), max_steps=max_steps, batch_size=2, lr=3e-2, save_every=2, progress=False,
                      resume=resume)
    trainer = Trainer(model, cfg, {"instruction": data}, pad_id=tok.pad_id)
    return trainer, trainer.fit(), model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A run of 4 steps: checkpoints at steps 2 and 4, the final adapter in the run folder."""
    out = tmp_path_factory.mktemp("faults") / "run"
    _, _, model = train(base, out)
    return out, {n: p.detach().clone() for n, p in la.trainable_parameters(model).items()}


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    return out


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_adapter_and_checkpoints_carry_checksums(run):
    for folder in (run, run / "checkpoint-0000002", run / "checkpoint-0000004"):
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        assert {WEIGHTS, CONFIG} <= set(listed)
    assert STATE in json.loads((run / "checkpoint-0000004" / MANIFEST).read_text())["files"]


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG])
@pytest.mark.parametrize("damage,said", [(flip_byte, "corrupt or was replaced"), (truncate, "is truncated")])
def test_damaged_adapter_file_is_refused_naming_it(base, run, name, damage, said):
    damage(run / name)
    model, tok = la.load_pretrained(base)
    with pytest.raises(ChecksumError, match=said) as err:
        la.load_adapter(model, run, tokenizer=tok)
    assert str(run / name) in str(err.value)
    assert model.adapter is None  # refused before anything was attached


def test_adapter_file_from_another_run_is_refused(base, run, tmp_path):
    _, _, _ = train(base, tmp_path / "other", max_steps=2, seed=7)
    shutil.copy(tmp_path / "other" / WEIGHTS, run / WEIGHTS)  # a valid safetensors file, but not this adapter's
    model, _ = la.load_pretrained(base)
    with pytest.raises(ChecksumError, match=f"{WEIGHTS} is corrupt or was replaced"):
        la.load_adapter(model, run)


def test_corrupt_manifest_is_refused(base, run):
    (run / MANIFEST).write_text("{not json")
    model, _ = la.load_pretrained(base)
    with pytest.raises(ChecksumError, match=f"{MANIFEST} is corrupt"):
        la.load_adapter(model, run)


def test_intact_adapter_loads_and_old_adapter_without_checksums_still_loads(base, run, trained):
    for remove_manifest in (False, True):
        if remove_manifest:
            (run / MANIFEST).unlink()
        model, _ = la.load_pretrained(base)
        la.load_adapter(model, run)
        for n, p in la.trainable_parameters(model).items():
            assert torch.equal(p, trained[1][n]), n


@pytest.mark.parametrize("name,damage", [(STATE, flip_byte), (STATE, truncate), (WEIGHTS, flip_byte),
                                         (CONFIG, truncate), (STATE, "delete")])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(base, run, name, damage, capsys):
    newest = run / "checkpoint-0000004"
    if damage == "delete":
        (newest / name).unlink()
    else:
        damage(newest / name)
    trainer, result, _ = train(base, run, max_steps=6)
    assert result.start_step == 2 and result.steps == 6
    out = capsys.readouterr().out
    assert "checkpoint-0000004 does not verify" in out and str(newest / name) in out
    assert "resuming from" in out and "checkpoint-0000002" in out
    assert (run / "corrupt-checkpoint-0000004").is_dir()  # kept for inspection, out of the way
    assert [r["step"] for r in trainer.log.records() if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_from_an_old_checkpoint_without_checksums(base, run):
    for folder in run.glob("checkpoint-*"):
        (folder / MANIFEST).unlink()
    _, result, _ = train(base, run, max_steps=6)
    assert result.start_step == 4


def test_old_checkpoint_without_checksums_that_does_not_parse_is_passed_over(base, run, capsys):
    newest = run / "checkpoint-0000004"
    (newest / MANIFEST).unlink()
    truncate(newest / STATE)
    _, result, _ = train(base, run, max_steps=6)
    assert result.start_step == 2
    assert f"cannot read {newest / STATE}" in capsys.readouterr().out


def test_no_checkpoint_that_verifies_is_an_error_listing_each(base, run):
    for folder in run.glob("checkpoint-*"):
        flip_byte(folder / STATE)
    with pytest.raises(ValueError, match="no checkpoint in .* verifies") as err:
        train(base, run, max_steps=6)
    assert "checkpoint-0000004: " in str(err.value) and "checkpoint-0000002: " in str(err.value)


def test_resume_is_exact_after_falling_back(base, run, trained, tmp_path):
    """Falling back to step 2 and training to step 4 again gives the same adapter as the uninterrupted run."""
    flip_byte(run / "checkpoint-0000004" / STATE)
    (run / "latest").write_text("checkpoint-0000004\n")
    _, result, model = train(base, run, max_steps=4)
    assert result.start_step == 2
    for n, p in la.trainable_parameters(model).items():
        assert torch.allclose(p, trained[1][n], rtol=0, atol=1e-6), n


# -- adapter / base model mismatch ----------------------------------------------------------------------------


def test_adapter_for_another_base_name_is_refused_with_both_names(run, tmp_path):
    other = save_tiny_folder(tmp_path / "other-model")  # same shape, another model
    model, tok = la.load_pretrained(other)
    with pytest.raises(ValueError, match="trained on another base model") as err:
        la.load_adapter(model, run)
    assert str(other) in str(err.value) and "tiny" in str(err.value)
    assert model.adapter is None
    la.load_adapter(model, run, force=True)  # the same shapes: --force loads it
    assert model.adapter is not None


def test_adapter_for_another_base_shape_is_refused_with_both_values(run, tmp_path):
    wider_vocab = save_tiny_folder(tmp_path / "tiny", vocab_size=512)  # same name, another vocabulary
    model, _ = la.load_pretrained(wider_vocab)
    with pytest.raises(ValueError, match=r"vocab_size 400 \(adapter\) vs 512 \(this model\)"):
        la.load_adapter(model, run)
    la.load_adapter(model, run, force=True)  # V1's tensors do not depend on the vocabulary: they still fit

    wider = save_tiny_folder(tmp_path / "wide" / "tiny", hidden_size=128)
    model, _ = la.load_pretrained(wider)
    with pytest.raises(ValueError, match=r"dim 64 \(adapter\) vs 128 \(this model\)"):
        la.load_adapter(model, run)
    with pytest.raises(ValueError, match="has shape"):  # forced, but the tensors do not fit
        la.load_adapter(model, run, force=True)


def test_cli_refuses_a_foreign_adapter_and_force_overrides(run, tmp_path, capsys):
    from llama_adapter.cli import main

    other = save_tiny_folder(tmp_path / "other-model")
    args = ["generate", "--model", str(other), "--adapter", str(run), "--prompt", "say hello", "--max-new-tokens", "2",
            "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "trained on another base model" in err and str(other) in err and "--force" in err
    assert main([*args, "--force"]) == 0


def test_cli_refuses_a_damaged_adapter_before_loading_the_base_model(run, tmp_path, capsys):
    from llama_adapter.cli import main

    truncate(run / WEIGHTS)
    args = ["generate", "--model", str(tmp_path / "no-such-model"), "--adapter", str(run), "--prompt", "x"]
    assert main(args) == 2  # the checksum is checked first: no time is spent on (or error about) the base model
    err = capsys.readouterr().err
    assert f"{run / WEIGHTS} is truncated" in err and "no-such-model" not in err
