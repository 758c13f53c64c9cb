"""Non-finite losses and gradients: the step is skipped (no parameter or optimizer state moves), counted in the
log, and `train.max_bad_steps` of them in a row stop the run with a clear message."""

from __future__ import annotations

import copy

import pytest
import torch

import llama_adapter as la
from llama_adapter.data import encode_pair
from llama_adapter.loss import lm_loss
from llama_adapter.train import TrainConfig, Trainer
from llama_adapter.train.faults import NonFiniteStop

PAIRS = [("say hello", "hello world"), ("count to three", "one two three"), ("say yes", "yes"),
         ("what colour is the circle?", "the circle is red")]


class Poisoned:
    """lm_loss, made NaN on the calls (0-based) listed in `nan_at`."""

    def __init__(self, nan_at):
        self.nan_at, self.calls = set(nan_at), 0

    def __call__(self, model, batch):
        loss = lm_loss(model, batch)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 in self.nan_at else loss


def make_trainer(tiny_folder, tmp_path, loss_fn=lm_loss, **kw):
    torch.manual_seed(0)
    model, tok = la.load_pretrained(tiny_folder)
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2))
    data = [encode_pair(tok, p, r, 64, f"pair{i}") for i, (p, r) in enumerate(PAIRS)]
    cfg = TrainConfig(**{**dict(out_dir=str(tmp_path / "run"), max_steps=6, batch_size=2, lr=3e-2, progress=False),
                         **kw})
    return Trainer(model, cfg, {"instruction": data}, pad_id=tok.pad_id, loss_fn=loss_fn), model


def snapshot(trainer):
    params = {n: p.detach().clone() for n, p in trainer.params.items()}
    return params, copy.deepcopy(trainer.optimizer.state_dict())


def assert_same_state(a, b):
    for n in a[0]:
        assert torch.equal(a[0][n], b[0][n]), n
    assert a[1]["param_groups"] == b[1]["param_groups"]
    assert a[1]["state"].keys() == b[1]["state"].keys()
    for k, s in a[1]["state"].items():
        for key, v in s.items():
            assert torch.equal(v, b[1]["state"][k][key]), (k, key)


def test_non_finite_loss_skips_the_step_and_moves_nothing(tiny_folder, tmp_path):
    trainer, _ = make_trainer(tiny_folder, tmp_path, Poisoned(nan_at={2, 3}))
    trainer.train_step(), trainer.train_step()
    before = snapshot(trainer)
    third, fourth = trainer.train_step(), trainer.train_step()
    assert third["skipped"] == fourth["skipped"] == "non-finite loss"
    assert (third["bad_in_a_row"], fourth["bad_in_a_row"], fourth["bad_steps"]) == (1, 2, 2)
    assert "loss" not in third and trainer.step == 4
    assert_same_state(before, snapshot(trainer))
    fifth = trainer.train_step()
    assert "skipped" not in fifth and trainer.bad_in_a_row == 0 and trainer.bad_steps == 2
    after = snapshot(trainer)
    assert any(not torch.equal(after[0][n], before[0][n]) for n in before[0])


def test_non_finite_gradient_skips_the_step(tiny_folder, tmp_path):
    trainer, model = make_trainer(tiny_folder, tmp_path)
    trainer.train_step()
    before = snapshot(trainer)
    name, param = next(iter(trainer.params.items()))
    hook = param.register_hook(lambda g: g * float("inf"))
    rec = trainer.train_step()
    hook.remove()
    assert rec["skipped"] == "non-finite gradient" and rec["bad_steps"] == 1
    assert_same_state(before, snapshot(trainer))
    assert "loss" in trainer.train_step()


def test_skipped_steps_are_logged_and_the_run_goes_on(tiny_folder, tmp_path, capsys):
    trainer, _ = make_trainer(tiny_folder, tmp_path, Poisoned(nan_at={1, 4}), log_every=3)
    result = trainer.fit()
    assert result.steps == 6 and result.train_loss is not None
    records = trainer.log.records()
    assert [(r["step"], r["skipped"], r["bad_steps"]) for r in records if "skipped" in r] == [
        (2, "non-finite loss", 1), (5, "non-finite loss", 2)]
    assert [r["step"] for r in records if "loss" in r] == [3, 6]  # log_every still applies to the others
    assert "step 2 skipped: non-finite loss" in capsys.readouterr().out


def test_max_bad_steps_in_a_row_stop_the_run(tiny_folder, tmp_path):
    trainer, model = make_trainer(tiny_folder, tmp_path, Poisoned(nan_at=range(1, 100)), max_bad_steps=3,
                                  save_every=1)
    with pytest.raises(NonFiniteStop, match=r"3 steps in a row \(to step 4\) had a non-finite loss or gradient "
                                            r"\(train.max_bad_steps=3\)"):
        trainer.fit()
    assert [r["bad_in_a_row"] for r in trainer.log.records() if "skipped" in r] == [1, 2, 3]
    assert trainer.step == 4


def test_bad_steps_that_are_not_in_a_row_do_not_stop_the_run(tiny_folder, tmp_path):
    trainer, _ = make_trainer(tiny_folder, tmp_path, Poisoned(nan_at={0, 1, 3, 4}), max_bad_steps=3)
    assert trainer.fit().steps == 6 and trainer.bad_steps == 4


def test_max_bad_steps_must_be_positive():
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        TrainConfig(max_bad_steps=0)
