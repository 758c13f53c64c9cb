"""How much of each synthetic question type can be read from the frozen encoder's 7x7 grid?

A ceiling for the adapters on the synthetic set (bench/synth_vqa.py): a small transformer
(3 layers, width 128, about 0.8M parameters) reads the standardised EfficientNet-Lite0 grid
tokens (49 x 1752, with learned or fixed position embeddings) together with the question's words and
classifies the answer. Trained from scratch on the same training questions the adapters see,
scored on the same test questions. Where this probe answers a type and the adapters do not,
the information is in the frozen features and the gap lies in the adapter path. With --pooled the
probe reads the mean of the 49 cells instead: one global vector, the multi-scale pooled features V1
multimodal sees, so the two show what the grid adds.

    python bench/grid_probe.py [--synth runs/synth-4k] [--epochs 10] [--fixed-cell-pos] [--pooled]
                               [--only TYPE] [--name grid_probe]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

from llama_adapter.data.multimodal import read_llava  # noqa: E402
from llama_adapter.model.load import cache_dir  # noqa: E402
from llama_adapter.vision import FeatureCache, load_encoder  # noqa: E402
from llama_adapter.vision.projectors import grid_position_embedding  # noqa: E402

ENCODER = "efficientnet-lite0"


def questions(root: Path, split: str) -> list[tuple[str, str, str, str]]:
    """(image path, question, answer, question type) for every turn of llava_<split>.json."""
    rows = []
    for record in read_llava(root / f"llava_{split}.json"):
        types = record.meta.get("qtypes") or [record.meta["qtype"]]
        for (q, a), qtype in zip(record.turns, types, strict=True):
            rows.append((str(record.image), q.strip().lower().rstrip("?"), a.strip().lower().rstrip("."), qtype))
    return rows


def grid_features(cache: FeatureCache, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid tokens [images, 49, C] of the distinct images, the image row of each path).

    One copy per image, not per question: a 16,000-image set has 60,000 questions, 20 GiB as copies.
    """
    unique = sorted(set(paths))
    tokens = None
    for i in range(0, len(unique), 64):
        chunk = cache.get(unique[i:i + 64]).tokens
        if tokens is None:  # sized by the first chunk: filled in place, no concatenated copy
            tokens = torch.empty(len(unique), *chunk.shape[1:])
        tokens[i:i + len(chunk)] = chunk.float()
    row = {p: i for i, p in enumerate(unique)}
    return tokens, torch.tensor([row[p] for p in paths])


class GridProbe(nn.Module):
    def __init__(self, token_dim: int, n_cells: int, vocab: int, q_len: int, n_answers: int, width: int = 128,
                 fixed_cell_pos: bool = False):
        super().__init__()
        self.cell = nn.Sequential(nn.Linear(token_dim, width), nn.LayerNorm(width))
        # learned, or the fixed 2-D sine-cosine code of the V2 query projector
        self.cell_pos = (nn.Buffer(grid_position_embedding(n_cells, width)) if fixed_cell_pos
                         else nn.Parameter(torch.randn(n_cells, width) * 0.02))
        self.word = nn.Embedding(vocab, width, padding_idx=0)
        self.word_pos = nn.Parameter(torch.randn(q_len + 1, width) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.1, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.out = nn.Linear(width, n_answers)

    def forward(self, grid: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        cells = self.cell(grid) + self.cell_pos
        text = torch.cat([self.cls.expand(len(words), -1, -1), self.word(words)], 1) + self.word_pos
        pad = torch.cat([torch.zeros(len(words), 1 + cells.shape[1], dtype=torch.bool), words == 0], 1)
        h = self.body(torch.cat([text[:, :1], cells, text[:, 1:]], 1), src_key_padding_mask=pad)
        return self.out(h[:, 0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth", default="runs/synth-4k")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--name", default="grid_probe")
    ap.add_argument("--only", help="train and score on this question type alone (position, yes_no, ...)")
    ap.add_argument("--fixed-cell-pos", action="store_true",
                    help="the V2 projector's fixed 2-D sine-cosine cell code instead of a learned one")
    ap.add_argument("--pooled", action="store_true",
                    help="the mean of the cells, one vector per image (V1 multimodal's global features)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    root = Path(args.synth)
    train, test = questions(root, "train"), questions(root, "test")
    if args.only:
        train, test = ([r for r in rows if r[3] == args.only] for rows in (train, test))
        if not test:
            raise SystemExit(f"{root}: no test questions of type {args.only!r}")
    cache = FeatureCache(cache_dir() / "features", load_encoder(ENCODER).freeze())
    (x_train, img_train), (x_test, img_test) = (grid_features(cache, [r[0] for r in rows]) for rows in (train, test))
    if args.pooled:  # the mean of average-pooled maps is the map's global mean: V1's multi-scale globals
        x_train, x_test = x_train.mean(1, keepdim=True), x_test.mean(1, keepdim=True)
    # statistics over training questions (an image counts once per question), as with per-question copies
    weight = torch.bincount(img_train, minlength=len(x_train)).float() / (len(img_train) * x_train.shape[1])
    mean = torch.einsum("i,ijc->c", weight, x_train)
    std = torch.einsum("i,ijc->c", weight, (x_train - mean) ** 2).sqrt() + 1e-5
    x_train.sub_(mean).div_(std)
    x_test.sub_(mean).div_(std)
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for r in train + test for w in r[1].split()}))}
    answers = {a: i for i, a in enumerate(sorted({r[2] for r in train + test}))}
    q_len = max(len(r[1].split()) for r in train + test)

    def encode(rows):
        words = [[vocab[w] for w in r[1].split()] for r in rows]
        return (torch.tensor([w + [0] * (q_len - len(w)) for w in words]),
                torch.tensor([answers[r[2]] for r in rows]))

    (w_train, y_train), (w_test, y_test) = encode(train), encode(test)
    probe = GridProbe(x_train.shape[-1], x_train.shape[1], len(vocab) + 1, q_len, len(answers),
                      fixed_cell_pos=args.fixed_cell_pos)
    steps = args.epochs * (len(train) // args.batch)
    opt = torch.optim.AdamW(probe.parameters(), 1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train))
        for i in range(0, len(order) - args.batch + 1, args.batch):
            b = order[i:i + args.batch]
            loss = F.cross_entropy(probe(x_train[img_train[b]], w_train[b]), y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t0
    probe.eval()
    with torch.no_grad():
        pred = torch.cat([probe(x_test[img_test[i:i + 256]], w_test[i:i + 256]).argmax(-1)
                          for i in range(0, len(test), 256)])
    hits = collections.defaultdict(list)
    for p, y, row in zip(pred.tolist(), y_test.tolist(), test):
        hits[row[3]].append(p == y)
    accuracy = {t: 100 * sum(v) / len(v) for t, v in sorted(hits.items())}
    lines = ["| type | test questions | grid probe accuracy |", "|---|---|---|"]
    lines += [f"| {t} | {len(hits[t])} | {a:.1f}% |" for t, a in accuracy.items()]
    n_params = sum(p.numel() for p in probe.parameters())
    source = "grid pooled to one vector" if args.pooled else "7x7 grid"
    table = (f"A {n_params / 1e6:.2f}M-parameter transformer probe reading the frozen {ENCODER} {source} and the "
             f"question, trained from scratch for {args.epochs} epochs on the {len(train)} training questions of "
             f"{root} ({train_seconds / 60:.1f} min; {'fixed sine-cosine' if args.fixed_cell_pos else 'learned'} cell "
             f"positions), scored on its {len(test)} test questions:\n\n" + "\n".join(lines))
    write_results(args.name, {"synth": str(root), "epochs": args.epochs, "fixed_cell_pos": args.fixed_cell_pos,
                              "pooled": args.pooled, "only": args.only,
                              "probe_parameters": n_params,
                              "train_seconds": train_seconds, "accuracy": accuracy,
                              "counts": {t: len(v) for t, v in hits.items()}}, table, machine_info())
    print(table)


if __name__ == "__main__":
    main()
