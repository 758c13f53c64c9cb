"""Kill tests: `llama-adapter finetune` in a subprocess, stopped by SIGTERM, SIGINT or SIGKILL at awkward moments.

SIGTERM mid-run writes a checkpoint and exits 75; the rerun resumes and ends with the adapter and loss log of
an uninterrupted run. SIGKILL (or a second SIGTERM) in the middle of writing a checkpoint (stalled by a
test-only environment variable) leaves the previous checkpoint loadable and the rerun resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_folder
from safetensors.torch import load_file

import llama_adapter as la
from llama_adapter.train.checkpoint import verify_checkpoint
from llama_adapter.train.faults import CHECKPOINT_DELAY_ENV, EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "v1_smollm2_alpaca_cpu.yaml"
STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    tiny = save_tiny_folder(root / "tiny")
    data = root / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "say hello", "input": "", "output": "hello world"},
                                {"instruction": "count", "input": "to three", "output": "one two three"},
                                {"instruction": "say yes", "input": "", "output": "yes"}] * 4))
    return root, tiny, data


def finetune(setup, out: Path, delay: float | None = None) -> subprocess.Popen:
    _, tiny, data = setup
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(CHECKPOINT_DELAY_ENV, None)
    if delay:
        env[CHECKPOINT_DELAY_ENV] = str(delay)
    args = [sys.executable, "-m", "llama_adapter.cli", "finetune", "--recipe", str(RECIPE), f"model={tiny}",
            f"data.train={data}", "data.val_size=0", "method.n_layers=2", f"train.out_dir={out}",
            f"train.max_steps={STEPS}", "train.save_every=4", "train.eval_every=0", "train.warmup_steps=2",
            "train.progress=false", "train.threads=1", "train.device=cpu", "train.precision=fp32", "train.seed=0"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the moment awaited:\n{out}\n{err}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


def logged_steps(out: Path) -> int:
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def losses(out: Path) -> dict[int, float]:
    records = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_run(out: Path, reference: Path) -> None:
    assert list(losses(out)) == list(range(1, STEPS + 1))
    assert losses(out) == pytest.approx(losses(reference), rel=0, abs=1e-6)
    got, want = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name


@pytest.fixture(scope="module")
def reference(setup):
    out = setup[0] / "uninterrupted"
    proc = finetune(setup, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_mid_run_checkpoints_and_the_rerun_matches_an_uninterrupted_run(setup, reference, tmp_path, sig):
    out = tmp_path / "run"
    proc = finetune(setup, out)
    wait_for(lambda: logged_steps(out) >= 2, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert f"{sig.name} received" in stderr and "rerun the same command" in stderr
    stopped = int(stderr.split("stopped after step ")[1].split()[0])
    assert 2 <= stopped < STEPS
    checkpoint = out / f"checkpoint-{stopped:07d}"
    assert verify_checkpoint(checkpoint)["step"] == stopped
    assert (out / "latest").read_text().strip() == checkpoint.name

    rerun = finetune(setup, out)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert_same_run(out, reference)


@pytest.mark.parametrize("how", ["SIGKILL", "second SIGTERM"])
def test_killed_while_writing_a_checkpoint_leaves_the_previous_one_and_resume_works(setup, reference, tmp_path, how):
    out = tmp_path / "run"
    proc = finetune(setup, out, delay=1.0)  # every checkpoint write stalls 1 s half-way
    wait_for(lambda: any(out.glob(".checkpoint-0000008.*")), proc)  # the second checkpoint is being written
    assert (out / "checkpoint-0000004").is_dir()
    if how == "SIGKILL":
        proc.kill()
    else:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if how == "SIGKILL" else 128 + signal.SIGTERM), stderr
    if how != "SIGKILL":
        assert "received again: exiting at once" in stderr
    assert not (out / "checkpoint-0000008").exists()
    assert (out / "latest").read_text().strip() == "checkpoint-0000004"
    assert verify_checkpoint(out / "checkpoint-0000004")["step"] == 4
    model, _ = la.load_pretrained(setup[1])
    la.load_adapter(model, out / "checkpoint-0000004")

    rerun = finetune(setup, out)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert not any(out.glob(".checkpoint-*")), "the half-written folder is cleaned up"
    assert_same_run(out, reference)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def rank_pid(root: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=`rank` under process `root`."""
    todo = children(root)
    while todo:
        pid = todo.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
        todo += children(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the torchrun workers through /proc")
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(setup, reference, tmp_path):
    _, tiny, data = setup
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "llama_adapter.cli", "finetune", "--recipe", str(RECIPE), f"model={tiny}", f"data.train={data}",
            "data.val_size=0", "method.n_layers=2", f"train.out_dir={out}", f"train.max_steps={STEPS}",
            "train.save_every=4", "train.eval_every=0", "train.warmup_steps=2", "train.progress=false",
            "train.threads=1", "train.device=cpu", "train.precision=fp32", "train.seed=0", "train.batch_size=2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(out) >= 2, proc, timeout=240)
    worker = rank_pid(proc.pid, 1)
    assert worker is not None
    os.kill(worker, signal.SIGTERM)  # only rank 1 hears it; rank 0 learns of it at the next step boundary
    _, stderr = proc.communicate(timeout=240)
    steps = {int(part.split()[0]) for part in stderr.split("stopped after step ")[1:]}
    assert len(steps) == 1, stderr[-3000:]  # both ranks stopped (and rank 0 saved) at the same step
    stopped = steps.pop()
    assert stderr.count("stopped after step") == 2 and stopped < STEPS
    assert verify_checkpoint(out / f"checkpoint-{stopped:07d}")["step"] == stopped

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert list(losses(out)) == list(range(1, STEPS + 1))
    assert losses(out) == pytest.approx(losses(reference), rel=0, abs=1e-5)  # 2 ranks x 2 = one process x 4
