"""Can each projector learn the synthetic set's colours on its own, and at which learning rate?

Isolates the projector from the language model: frozen EfficientNet-Lite0 features of the
single-shape images (standardised as in training) -> the projector -> one linear layer ->
the shape's colour (6 classes). Trains on the synthetic train split, scores held-out test
images, for V2's VisualQueryProjector and V1's GlobalMLPProjector at several learning rates
(AdamW, batch 16). This is what set `projector_lr_scale` in the V2 CPU recipe.
Writes bench/results/projector_lr.{json,md}.

    python bench/projector_lr.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, write_results  # noqa: E402

from llama_adapter.data.synth import synthesize  # noqa: E402
from llama_adapter.methods.visual import VisualFrontend  # noqa: E402
from llama_adapter.vision import GlobalMLPProjector, VisualQueryProjector  # noqa: E402

LM_WIDTH = 576  # SmolLM2-135M, the width both projectors map to in the CPU recipes
PROJECTORS = ("query (V2)", "global MLP (V1)")


def single_shape_images(synth: Path, split: str) -> tuple[list[str], list[str]]:
    meta = json.loads((synth / "images.json").read_text())
    rows = [m for m in meta.values() if m.get("split") == split and len(m.get("shapes", [])) == 1]
    return [str(synth / m["image"]) for m in rows], [m["shapes"][0]["colour"] for m in rows]


def build(kind: str, frontend: VisualFrontend) -> torch.nn.Module:
    enc = frontend.encoder
    if kind == PROJECTORS[0]:
        return VisualQueryProjector(enc.token_dim, LM_WIDTH, n_queries=10, n_blocks=2, width=256)
    return GlobalMLPProjector(enc.global_dims, LM_WIDTH, hidden=256, input_norm=False)


def train_and_score(kind: str, frontend: VisualFrontend, train: tuple, test: tuple, lr: float, steps: int,
                    seed: int) -> dict:
    torch.manual_seed(seed)
    (x_tr, y_tr), (x_te, y_te) = train, test
    proj = build(kind, frontend)
    width = proj(x_tr[0]).flatten(1).shape[-1]
    head = torch.nn.Linear(width, int(y_tr.max()) + 1)
    opt = torch.optim.AdamW([*proj.parameters(), *head.parameters()], lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(y_tr), (16,))
        loss = F.cross_entropy(head(proj(x_tr[idx]).flatten(1)), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (head(proj(x_te).flatten(1)).argmax(-1) == y_te).float().mean().item()
    return {"projector": kind, "lr": lr, "test_accuracy": round(acc, 4),
            "train_loss_last_20": round(sum(losses[-20:]) / 20, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth", default="runs/synth")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 5e-3, 1e-3, 3e-4])
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(bench_threads())
    synth = Path(args.synth)
    if not (synth / "meta.json").is_file():
        synthesize(synth, 2000, seed=0)
    frontend = VisualFrontend("efficientnet-lite0")
    cpu = torch.device("cpu")
    splits = {split: single_shape_images(synth, split) for split in ("train", "test")}
    frontend.train()  # one pass (with gradients on, as in a training step) gathers the statistics
    frontend.features(splits["train"][0], len(splits["train"][0]), cpu)
    frontend.eval()
    labels: dict[str, int] = {}
    data = []
    for images, colours in splits.values():
        with torch.no_grad():
            feats, _ = frontend.features(images, len(images), cpu)
        data.append((feats, torch.tensor([labels.setdefault(c, len(labels)) for c in colours])))
    results = [train_and_score(kind, frontend, data[0], data[1], lr, args.steps, seed)
               for kind in PROJECTORS for lr in args.lrs for seed in range(args.seeds)]
    table = ["| projector | lr | held-out colour accuracy (per seed) | final train loss |", "|---|---|---|---|"]
    for kind in PROJECTORS:
        for lr in args.lrs:
            runs = [r for r in results if r["projector"] == kind and r["lr"] == lr]
            accuracies = " / ".join(f"{r['test_accuracy']:.0%}" for r in runs)
            losses = " / ".join(f"{r['train_loss_last_20']:.2f}" for r in runs)
            table.append(f"| {kind} | {lr:g} | {accuracies} | {losses} |")
    md = (f"Projector alone -> linear head -> colour of the single shape (6 classes, chance 17%): "
          f"{len(data[0][1])} training images, {len(data[1][1])} held-out, {args.steps} steps x batch 16.\n\n"
          + "\n".join(table))
    write_results("projector_lr", {"results": results, "steps": args.steps, "train_images": len(data[0][1]),
                                   "test_images": len(data[1][1])}, md, machine_info())
    print(md)


if __name__ == "__main__":
    main()
