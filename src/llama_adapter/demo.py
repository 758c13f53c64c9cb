"""`llama-adapter demo`: the main job on the embedded defaults, end to end, in a few minutes on a CPU.

Writes a small synthetic set of coloured shapes, fine-tunes LLaMA-Adapter V1 multimodal
(SmolLM2-135M + EfficientNet-Lite0, both frozen; recipes/v1mm_smollm2_synth_demo.yaml) on
one-question records of three question types (colour, shape, count; balanced), then asks the held-out images' questions
twice: with the image, and with a blank grey image of the same size in its place. A model that
uses the picture scores far above chance with it and drops to chance without it; the answers for
a few held-out images and the loss curve show the rest. The frozen encoder's features are cached
on disk (under $LLAMA_ADAPTER_CACHE), so a second run skips the encoder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data.multimodal import Conversation
    from .eval.vqa import VQAResult
    from .train.trainer import TrainResult

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "v1mm_smollm2_synth_demo.yaml"
QTYPES = ("colour", "shape", "count")


@dataclass
class DemoConfig:
    """The demo's sizes: 160 steps on 320 images train in about a minute on an idle 2-core CPU."""

    out: str = "runs/demo"
    steps: int = 160
    images: int = 320  # synthetic training images (each gives one record per question type asked about it)
    test_images: int = 80
    qtypes: tuple[str, ...] = QTYPES
    show: int = 6  # held-out images whose answers are printed
    recipe: str = str(RECIPE)
    overrides: tuple[str, ...] = ()  # recipe overrides, "train.lr=0.01"


def chance(qtype: str) -> float:
    """Accuracy of a uniform guess among the answers a question type allows."""
    from .data.synth import COLOURS, KINDS

    return {"colour": 1 / len(COLOURS), "colour_of": 1 / len(COLOURS), "shape": 1 / len(KINDS),
            "count": 1 / 4}.get(qtype, 1 / 2)


def one_question_records(llava_train: Path, qtypes: tuple[str, ...], out: Path) -> Path:
    """Split the synthetic set's multi-question training records into one record per (image, question)
    of the chosen types, the layout of the test questions. Every image has a count question but only
    one in four a colour and a shape question (those of single shapes), so the rarer types' records are
    repeated until each type has as many as the most frequent: a short run sees them all as often."""
    rows = json.loads(llava_train.read_text())
    records: list[dict[str, Any]] = []
    for r in rows:
        turns = r["conversations"]
        for j, qtype in enumerate(r["qtypes"]):
            if qtype in qtypes:
                human = "<image>\n" + turns[2 * j]["value"].replace("<image>\n", "")
                records.append({"id": f"{r['id']}_{qtype}", "image": r["image"], "qtype": qtype,
                                "conversations": [{"from": "human", "value": human},
                                                  {"from": "gpt", "value": turns[2 * j + 1]["value"]}]})
    by_type = {q: [r for r in records if r["qtype"] == q] for q in qtypes}
    most = max(map(len, by_type.values()))
    balanced = [rs[i % len(rs)] for rs in by_type.values() if rs for i in range(most)]
    out.write_text(json.dumps(balanced, indent=0) + "\n")
    return out


def synthetic_set(folder: Path, images: int, test_images: int) -> Path:
    """The synthetic set in `folder`, written unless one of the same size is there already."""
    from .data.synth import synthesize

    meta = folder / "meta.json"
    if meta.is_file():
        counts = json.loads(meta.read_text())["counts"]
        if (counts["train_images"], counts["test_images"]) == (images, test_images):
            return folder
    synthesize(folder, images, seed=0, n_test=test_images, ocr_words=0, overwrite=True)
    return folder


def loss_summary(log: Path, points: int = 6) -> str:
    """The training loss at a few steps (mean of the steps around each), from the run's log.jsonl."""
    rows = [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    if not rows:
        return "no losses logged"
    marks = sorted({round(i * (len(rows) - 1) / (points - 1)) for i in range(points)})
    width = max(1, len(rows) // 20)
    cells = []
    for m in marks:
        near = [r["loss"] for r in rows[max(0, m - width): m + width + 1]]
        cells.append(f"step {rows[m]['step']}: {sum(near) / len(near):.2f}")
    return ", ".join(cells)


@dataclass
class DemoResult:
    """What `train_and_score` measured; `report` prints it."""

    test: list[Conversation]  # the held-out questions asked, in order
    with_image: VQAResult
    blank: VQAResult  # the same questions with a blank grey image of the same size instead
    train: TrainResult
    seconds: float  # all of it: data, training, answering
    answer_seconds: float


def train_and_score(cfg: DemoConfig) -> DemoResult:
    """Write the data, train the recipe's adapter, answer the held-out questions with and without the image."""
    from .data.multimodal import read_llava
    from .eval.vqa import evaluate_with_blank_control
    from .recipe import load_recipe
    from .runner import run_recipe

    t0 = time.perf_counter()
    out = Path(cfg.out)
    synth = synthetic_set(out / "synth", cfg.images, cfg.test_images)
    train_file = one_question_records(synth / "llava_train.json", cfg.qtypes, synth / "demo_train.json")
    test = [r for r in read_llava(synth / "llava_test.json") if r.meta["qtype"] in cfg.qtypes]
    print(f"synthetic shapes: {cfg.images} training / {cfg.test_images} held-out images in {synth}; "
          f"questions: {', '.join(cfg.qtypes)}", flush=True)
    recipe = load_recipe(cfg.recipe, [f"data.train={train_file}", f"train.out_dir={out / 'adapter'}",
                                      f"train.max_steps={cfg.steps}", "train.resume=false", *cfg.overrides])
    result, model, tok = run_recipe(recipe)
    t1 = time.perf_counter()
    src = recipe.data[0]
    looked, blind = evaluate_with_blank_control(model, tok, synth / "llava_test.json", src.template,
                                                src.image_placeholder, qtypes=set(cfg.qtypes), batch_size=32,
                                                max_new_tokens=4)  # "Yellow." and its end of turn
    t2 = time.perf_counter()
    return DemoResult(test, looked, blind, result, t2 - t0, t2 - t1)


def report(r: DemoResult, show: int) -> str:
    """The accuracy table (with the image, blank, chance), a few held-out images' answers, the loss curve."""
    lines = [f"held-out questions ({len(r.test)}): accuracy with the image | with a blank grey image instead | chance"]
    for q, acc in r.with_image.by_type.items():
        lines.append(f"  {q:8s} {r.with_image.counts[q]:4d}   {acc:6.1%} | {r.blank.by_type[q]:6.1%} | "
                     f"{chance(q):4.0%}")
    lines.append(f"  {'all':8s} {len(r.test):4d}   {r.with_image.accuracy:6.1%} | {r.blank.accuracy:6.1%}")
    lines += ["", "answers for a few held-out images (with the image | with the blank one):"]
    by_image: dict[Path | None, list[int]] = {}
    for i, rec in enumerate(r.test):
        by_image.setdefault(rec.image, []).append(i)
    for image, rows in list(by_image.items())[:show]:
        lines.append(f"  {image}")
        for i in rows:
            seen, blank = r.with_image.predictions[i], r.blank.predictions[i]
            lines.append(f"    {r.test[i].turns[0][0]:34s} {'ok' if seen['correct'] else 'XX'} "
                         f"{seen['reply'].strip():10s} | {blank['reply'].strip():10s} (reference: {seen['answer']})")
    out = r.train.out_dir
    lines += ["", f"training loss: {loss_summary(out / 'log.jsonl')}",
              f"loss curve: {out / 'loss.png'}; adapter: {out}",
              f"time: {r.seconds:.0f} s ({r.train.seconds:.0f} s training {r.train.steps} steps, "
              f"{r.answer_seconds:.0f} s answering {2 * len(r.test)} questions)"]
    return "\n".join(lines)


def run_demo(cfg: DemoConfig | None = None, **options: Any) -> int:
    """`llama-adapter demo`: options override DemoConfig's fields."""
    cfg = cfg or DemoConfig(**options)
    print("\n" + report(train_and_score(cfg), cfg.show))
    return 0
