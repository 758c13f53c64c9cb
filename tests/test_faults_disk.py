"""A full disk or an unwritable out_dir: refused before training, and during a save the previous checkpoint
survives and the error says what happened."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import llama_adapter as la
from llama_adapter.data import encode_pair
from llama_adapter.train import TrainConfig, Trainer, faults
from llama_adapter.train import checkpoint as checkpoint_module
from llama_adapter.train.checkpoint import verify_checkpoint
from llama_adapter.train.faults import CheckpointWriteError

PAIRS = [("say hello", "hello world"), ("count to three", "one two three"), ("say yes", "yes")]


def make_trainer(tiny_folder, out, patch=None):
    """A trainer for 4 steps with checkpoints at steps 2 and 4; `patch()` runs just before it is built."""
    torch.manual_seed(0)
    model, tok = la.load_pretrained(tiny_folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2))
    data = [encode_pair(tok, p, r, 64, f"pair{i}") for i, (p, r) in enumerate(PAIRS)]
    cfg = TrainConfig(out_dir=str(out), max_steps=4, batch_size=2, lr=3e-2, save_every=2, progress=False)
    if patch is not None:
        patch()
    return Trainer(model, cfg, {"instruction": data}, pad_id=tok.pad_id)


def test_out_dir_that_cannot_be_a_folder_is_refused_before_training(tiny_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError, match=f"train.out_dir {blocker / 'run'} is not writable"):
        make_trainer(tiny_folder, blocker / "run")


def test_full_disk_is_refused_before_training(tiny_folder, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    with pytest.raises(CheckpointWriteError, match=r"has 1.0 MiB free; a checkpoint needs about"):
        make_trainer(tiny_folder, tmp_path / "run", lambda: monkeypatch.setattr(
            faults.shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1 << 20)))


def test_disk_that_fills_on_the_write_probe_is_refused(tiny_folder, tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="is not writable \\(the disk is full\\)"):
        make_trainer(tiny_folder, tmp_path / "run", lambda: monkeypatch.setattr(faults.os, "write", full))
    monkeypatch.undo()
    assert not list((tmp_path / "run").iterdir())  # the probe file is gone


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = make_trainer(tiny_folder, out)
    real_save = torch.save

    def save(obj, path, *a, **kw):
        if "checkpoint-0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with pytest.raises(CheckpointWriteError) as err:
        trainer.fit()
    message = str(err.value)
    assert "could not write checkpoint" in message and "checkpoint-0000004" in message
    assert "No space left on device" in message
    assert f"the previous checkpoint {out / 'checkpoint-0000002'} is intact" in message
    assert not (out / "checkpoint-0000004").exists() and not list(out.glob(".checkpoint-*"))
    assert (out / "latest").read_text().strip() == "checkpoint-0000002"
    assert verify_checkpoint(out / "checkpoint-0000002")["step"] == 2

    monkeypatch.undo()  # space freed: the rerun resumes from step 2
    assert make_trainer(tiny_folder, out).fit().start_step == 2


def test_stale_temporaries_of_a_killed_write_are_removed_at_start(tiny_folder, tmp_path):
    out = tmp_path / "run"
    (out / ".checkpoint-0000004.abc123").mkdir(parents=True)
    (out / ".latest.xyz.tmp").write_text("half")
    keep = out / "checkpoint-0000002"
    keep.mkdir()
    make_trainer(tiny_folder, out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-0000002"]
    shutil.rmtree(keep)


def test_disk_full_when_writing_the_final_adapter_names_the_checkpoint_that_holds_it(tiny_folder, tmp_path,
                                                                                     monkeypatch):
    from llama_adapter.methods import io

    out = tmp_path / "run"
    trainer = make_trainer(tiny_folder, out)
    real = io.save_file

    def save_file(tensors, path, metadata=None):
        if Path(path).parent == out:  # the final adapter, not a checkpoint's (built in a temporary folder)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", save_file)
    with pytest.raises(CheckpointWriteError, match="could not write the final adapter .* checkpoint-0000004 there"):
        trainer.fit()
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob(".*.tmp"))
    assert verify_checkpoint(out / "checkpoint-0000004")["step"] == 4
