"""Many processes (torchrun, gloo on this CPU) train exactly as one process on the same global batch.

For V1 (text), V2 joint (caption and instruction steps mixed) and LaVIN (text-only and image
examples mixed, so that some rank micro-batches hold no image): `torchrun --nproc_per_node 2 -m
llama_adapter.cli finetune` with per-rank batch b logs the same losses step by step and saves the
same adapter as one process with batch 2b, with `train.shard` none and fsdp (FSDP2), with activation
checkpointing and gradient accumulation; a run stopped after a checkpoint resumes to the same
adapter; V2's idle group stays bit-identical on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny_folder
from PIL import Image
from safetensors.torch import load_file

from llama_adapter.train.distributed import Dist, sum_gradients
from llama_adapter.train.trainer import BatchSampler

ROOT = Path(__file__).resolve().parents[1]
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
           patch_size=8)
B = 2  # per-rank batch; the single process takes 2B
STEPS = 4


def env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    return e


def launch(args: list[str], nproc: int, timeout: int = 240) -> None:
    """Run `args` (a module and its arguments) in one process, or under torchrun with `nproc`."""
    head = [sys.executable, "-m"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    done = subprocess.run(head + args, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny random LLaMA folder, a tiny random CLIP folder, images and the three data sets."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_folder(root / "llama")
    torch.manual_seed(0)
    clip = root / "clip"
    CLIPVisionModel(CLIPVisionConfig(**VIT)).save_pretrained(str(clip))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip))
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"p{i}.png")
    words = ["red", "blue", "green", "circle", "square", "left", "right", "the quick brown fox"]
    alpaca = [{"instruction": f"say {w} {i}", "input": "" if i % 2 else "hello world", "output": f"{w} " * (1 + i % 3)}
              for i, w in enumerate(words + words[::-1])]
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    captions = [{"image": f"p{i}.png", "caption": f"a {words[i]} shape on the {words[7 - i]}"} for i in range(8)]
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    llava = []
    for i in range(12):
        turn = [{"from": "human", "value": f"what is {words[i % 8]}?"},
                {"from": "gpt", "value": f"it is {words[i % 5]}"}]
        rec: dict = {"id": f"q{i}", "conversations": turn}
        if i % 3 == 0:  # a third of the questions have an image
            rec["image"] = f"p{i % 8}.png"
        llava.append(rec)
    (root / "llava.json").write_text(json.dumps(llava))
    return {"root": root, "model": model, "clip": clip, "images": images}


def recipe(world: dict[str, Path], method: str) -> dict:
    root, vision = world["root"], f"clip:{world['clip']}"
    alpaca = {"train": str(root / "alpaca.json"), "format": "alpaca", "max_len": 160}
    methods = {
        "v1": ({"name": "adapter_v1", "prompt_len": 4, "n_layers": 2}, [alpaca], {}),
        "v2": ({"name": "adapter_v2", "prompt_len": 4, "n_layers": 3, "vision": vision, "visual_queries": 4,
                "visual_blocks": 1, "visual_width": 32},
               [{"train": str(root / "captions.jsonl"), "format": "captions", "image_root": str(world["images"]),
                 "template": "plain", "max_len": 64}, alpaca],
               {"caption": 0.5, "instruction": 0.5}),
        "lavin": ({"name": "lavin", "rank": 4, "dropout": 0.0, "vision": vision, "neck_hidden": 16},
                  [{"train": str(root / "llava.json"), "format": "llava", "image_root": str(world["images"]),
                    "template": "plain", "max_len": 64}],
                  {}),
    }
    m, data, mix = methods[method]
    train = {"max_steps": STEPS, "batch_size": 2 * B, "lr": 5e-3, "warmup_steps": 0, "precision": "fp32",
             "device": "cpu", "threads": 1, "progress": False, "seed": 3, "mix": mix}
    return {"model": str(world["model"]), "method": m, "data": data, "train": train}


def finetune(world: dict[str, Path], method: str, name: str, nproc: int, **train) -> Path:
    tree = recipe(world, method)
    tree["train"].update(out_dir=str(world["root"] / name), **train)
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    launch(["llama_adapter.cli", "finetune", "--recipe", str(path)], nproc)
    return world["root"] / name


def losses(out: Path) -> list[tuple[int, str, float]]:
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln]
    return [(r["step"], r["kind"], r["loss"]) for r in recs if "loss" in r]


def assert_same_run(one: Path, many: Path) -> None:
    a, b = losses(one), losses(many)
    # one record per step: rank 0 alone writes the log
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, STEPS + 1))
    assert [k for _, k, _ in a] == [k for _, k, _ in b]
    for (step, _, x), (_, _, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4), f"step {step}: loss {x} in one process, {y} in two"
    ta, tb = load_file(str(one / "adapter_model.safetensors")), load_file(str(many / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for n in ta:
        assert (ta[n] - tb[n]).abs().max().item() <= 1e-5, n
    init = torch.zeros(())
    assert any(not torch.equal(t, init.expand_as(t)) for t in ta.values())  # the adapter trained


# -- the sync itself, in one process -------------------------------------------------------------

def test_bucket_layout_does_not_depend_on_which_gradients_exist(monkeypatch):
    """Two ranks, one with a gradient for every parameter and one without the 'visual' one: both
    send the same layout, the missing gradient counts as zeros, and an untouched parameter stays None."""
    sent = []

    def fake_all_reduce(t):
        sent.append(t.clone())
        t.mul_(2)  # the peer's buffer equals ours: enough to check the write-back

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    layouts = []
    for with_visual in (True, False):
        ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(4))]
        ps[0].grad = torch.full((3,), 0.5)
        ps[1].grad = torch.full((2,), 0.25) if with_visual else None
        sent.clear()
        sum_gradients(ps, Dist(0, 2), bucket_elements=6)
        layouts.append([t.numel() for t in sent])
        assert ps[0].grad.tolist() == [1.0] * 3 and ps[2].grad is None
        assert (ps[1].grad is None) != with_visual
        if with_visual:
            assert ps[1].grad.tolist() == [0.5, 0.5]
    assert layouts[0] == layouts[1] == [3 + 1, 2 + 1, 4 + 1]  # one flag per parameter, same buckets on both


def test_batch_sampler_shards_each_global_batch_without_overlap_or_loss():
    one = BatchSampler(10, 2 * B, seed=1, d=Dist())
    ranks = [BatchSampler(10, B, seed=1, d=Dist(r, 2)) for r in range(2)]
    for _ in range(7):  # past an epoch boundary
        whole = one.next()
        parts = [s.next() for s in ranks]
        assert parts[0] + parts[1] == whole and not set(parts[0]) & set(parts[1])


# -- torchrun against one process ------------------------------------------------------------------

def test_v1_two_processes_equal_one_with_ddp_and_fsdp(world):
    one = finetune(world, "v1", "v1-one", 1)
    assert_same_run(one, finetune(world, "v1", "v1-ddp", 2, batch_size=B // 2, grad_accum=2,
                                  activation_checkpointing=True))
    assert_same_run(one, finetune(world, "v1", "v1-fsdp", 2, batch_size=B // 2, grad_accum=2, shard="fsdp",
                                  activation_checkpointing=True))


def test_v2_joint_two_processes_equal_one_with_ddp_and_fsdp(world):
    one = finetune(world, "v2", "v2-one", 1)
    assert {k for _, k, _ in losses(one)} == {"caption", "instruction"}
    # plain here: the encoder's running feature statistics, merged over the ranks, advance per micro-batch,
    # so gradient accumulation is compared on V1
    assert_same_run(one, finetune(world, "v2", "v2-ddp", 2, batch_size=B))
    assert_same_run(one, finetune(world, "v2", "v2-fsdp", 2, batch_size=B, shard="fsdp", activation_checkpointing=True))


def lavin_steps_with_an_imageless_rank(world: dict[str, Path], batch: int, accum: int) -> int:
    """How many micro-batches of the run have one rank with images and the other without."""
    has_image = ["image" in r for r in json.loads((world["root"] / "llava.json").read_text())]
    samplers = [BatchSampler(len(has_image), batch, seed=3, d=Dist(r, 2)) for r in range(2)]
    mixed = 0
    for _ in range(STEPS * accum):
        flags = [any(has_image[i] for i in s.next()) for s in samplers]
        mixed += flags[0] != flags[1]
    return mixed


def test_lavin_mixed_modalities_two_processes_equal_one_with_ddp_and_fsdp(world):
    assert lavin_steps_with_an_imageless_rank(world, B, 1) > 0  # the case that diverged silently before
    one = finetune(world, "lavin", "lavin-one", 1)
    ddp = finetune(world, "lavin", "lavin-ddp", 2, batch_size=B, save_every=2)
    assert_same_run(one, ddp)
    assert_same_run(one, finetune(world, "lavin", "lavin-fsdp", 2, batch_size=B, shard="fsdp",
                                  activation_checkpointing=True))

    # Stopped right after the step-2 checkpoint: the folder as a killed run leaves it (the later
    # checkpoint, the final adapter and the later log lines are what the kill would have prevented
    # or what resume must ignore). Resuming under torchrun ends where the uninterrupted run ended.
    killed = world["root"] / "lavin-killed"
    shutil.copytree(ddp, killed)
    shutil.rmtree(killed / "checkpoint-0000004")
    (killed / "adapter_model.safetensors").unlink()
    (killed / "latest").write_text("checkpoint-0000002\n")
    finetune(world, "lavin", "lavin-killed", 2, batch_size=B, save_every=2)
    assert losses(killed) == losses(ddp)
    assert_same_run(one, killed)


@pytest.mark.parametrize("shard", [pytest.param("none", marks=pytest.mark.slow), "fsdp"])  # same sync code in both
def test_v2_idle_group_and_frozen_base_stay_bit_identical_on_every_rank(world, shard):
    out = world["root"] / f"v2-idle-{shard}"
    launch(["dist_worker", str(world["model"]), str(world["clip"]), str(world["root"]), str(out), shard], 2)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert {s["kind"] for s in rep["steps"]} == {"caption", "instruction"}
        for s in rep["steps"]:
            assert s["active_moved"] > 0, s  # the step did train its group
            assert s["idle_moved"] == [], s  # ... and not one tensor of the other group changed
            assert s["base_moved"] == [], s
    assert reports[0]["final"] == reports[1]["final"]  # the ranks hold the same adapter
