"""Run under torchrun by test_distributed.py: V2 joint training, and each rank reports, step by step,
which tensors of the idle group and of the frozen base changed (none may) and its final adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import llama_adapter as la
from llama_adapter.data.multimodal import collate_multimodal
from llama_adapter.data.sources import DataConfig, load_source
from llama_adapter.methods.adapter_v2 import AdapterV2Config
from llama_adapter.train import TrainConfig, Trainer


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, gathered when FSDP2 shards it."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def main(model_dir: str, clip_dir: str, data_dir: str, out: str, shard: str) -> None:
    torch.manual_seed(0)
    model, tok = la.load_pretrained(model_dir)
    la.attach(model, AdapterV2Config(prompt_len=4, n_layers=3, vision=f"clip:{clip_dir}", visual_queries=4,
                                     visual_blocks=1, visual_width=32))
    root = Path(data_dir)
    sources = [DataConfig(train=str(root / "captions.jsonl"), format="captions", image_root=str(root / "images"),
                          template="plain", max_len=64),
               DataConfig(train=str(root / "alpaca.json"), format="alpaca", max_len=160)]
    train = {s.kind: load_source(s, tok)[0] for s in sources}
    cfg = TrainConfig(out_dir=out, max_steps=6, batch_size=2, lr=2e-2, device="cpu", threads=1, progress=False,
                      mix={"caption": 0.5, "instruction": 0.5}, shard=shard, seed=5)
    trainer = Trainer(model, cfg, train, collate_fn=lambda ex: collate_multimodal(ex, tok.pad_id))
    groups = trainer.kind_params
    trainable = set(trainer.params)
    named = dict(model.named_parameters())
    steps = []
    for _ in range(cfg.max_steps):
        kind = trainer.kind_for_step(trainer.step)
        before = {n: full(p).clone() for n, p in named.items()}
        trainer.train_step()
        changed = {n for n, p in named.items() if not torch.equal(full(p), before[n])}
        active = set(groups[kind])
        steps.append({"kind": kind, "active_moved": len(changed & active),
                      "idle_moved": sorted(changed & (trainable - active)),
                      "base_moved": sorted(changed - trainable)})
    final = {n: full(named[n]).double().sum().item() for n in sorted(trainable)}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{trainer.dist.rank}.json").write_text(json.dumps({"steps": steps, "final": final}))


if __name__ == "__main__":
    main(*sys.argv[1:6])
