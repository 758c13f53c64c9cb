"""Writing the data set: `synthesize` draws images and questions into files (LLaVA, captions, OCR, ScienceQA)."""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .drawing import COLOURS, KINDS, WORDS, draw_shapes, draw_word, place_shapes
from .questions import (
    ANSWER_FORMATS,
    CAPTION_FORMAT,
    OCR_QUESTION,
    QA,
    QTYPES,
    _side_qa,
    describe,
    make_questions,
    reply_text,
    sqa_problem,
)


@dataclass
class SynthSummary:
    """What `synthesize` wrote: the paths (absolute) and counts."""

    out_dir: Path
    seed: int
    n_train: int
    n_test: int
    n_ocr_train: int
    n_ocr_test: int
    llava_train: Path
    llava_test: Path
    captions_train: Path
    captions_test: Path
    ocr_train: Path
    ocr_test: Path
    scienceqa: Path  # problems.json
    meta: Path
    images: Path  # images.json: per-image metadata
    test_records: int = 0
    qtype_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> qtype -> QAs


def png_bytes(img: Image.Image) -> bytes:
    """Fixed PNG options and no metadata chunks, so the bytes depend on the pixels alone."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _llava_record(rid: str, image: str, qas: list[QA], single: bool) -> dict[str, Any]:
    conv = []
    for j, qa in enumerate(qas):
        conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + qa.question})
        conv.append({"from": "gpt", "value": reply_text(qa.answer, qa.qtype)})
    rec: dict[str, Any] = {"id": rid, "image": image, "conversations": conv}
    if single:
        rec.update(qtype=qas[0].qtype, answer=qas[0].answer)
    else:
        rec["qtypes"] = [qa.qtype for qa in qas]
    return rec


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _dump_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


OUTPUTS = ("images", "scienceqa", "llava_train.json", "llava_test.json", "captions_train.jsonl",
           "captions_test.jsonl", "ocr_train.json", "ocr_test.json", "images.json", "meta.json")


def _prepare(out: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds synthetic data ({', '.join(existing)}); "
                              f"choose another folder or pass overwrite=True")
    for name in existing:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / "images").mkdir(parents=True)
    (out / "scienceqa" / "images").mkdir(parents=True)


def synthesize(out_dir: str | Path, n: int, seed: int = 0, n_test: int | None = None, image_size: int = 224,
               ocr_words: int | None = None, overwrite: bool = False) -> SynthSummary:
    """Write the data set to `out_dir`: n train shape images, n_test (default n//4) test shape images,
    ocr_words (default n//4) train word images and proportionally many test word images."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 pixels, got {image_size}")
    n_test = max(1, n // 4) if n_test is None else n_test
    n_ocr = n // 4 if ocr_words is None else ocr_words
    if n_test < 0 or n_ocr < 0:
        raise ValueError(f"n_test and ocr_words must be >= 0, got {n_test} and {n_ocr}")
    n_ocr_test = -(-n_ocr * n_test // n)  # the same test:train ratio as the shape images, rounded up
    out = Path(out_dir).resolve()
    _prepare(out, overwrite)

    images: dict[str, dict[str, Any]] = {}
    llava: dict[str, list] = {"train": [], "test": []}
    captions: dict[str, list] = {"train": [], "test": []}
    ocr: dict[str, list] = {"train": [], "test": []}
    problems: dict[str, dict[str, Any]] = {}
    sqa_sources: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    seen: set[tuple] = set()  # shape sets already drawn: test images never repeat a train image

    for split, count in (("train", n), ("test", n_test)):
        rng = random.Random(f"llama-adapter-synth/{seed}/{split}")
        i = 0
        while i < count:
            shapes = place_shapes(rng, rng.randint(1, 4), image_size)
            key = tuple((s.colour, s.kind, s.x0, s.y0, s.size) for s in shapes)
            if key in seen:
                continue
            seen.add(key)
            background = (rng.randint(235, 255), rng.randint(235, 255), rng.randint(235, 255))
            data = png_bytes(draw_shapes(shapes, image_size, background))
            iid = f"{split}_{i:06d}"
            rel = f"images/{iid}.png"
            (out / rel).write_bytes(data)
            qas = make_questions(rng, shapes)
            rng.shuffle(qas)
            # the side question draws from its own generator: the images and the other questions stay
            # those of the sets made before it existed, so earlier results remain comparable
            side_rng = random.Random(f"llama-adapter-synth/{seed}/{split}/side/{i}")
            side_qa = _side_qa(side_rng, shapes, image_size)
            asked = list(qas)
            if side_qa is not None:
                asked.insert(side_rng.randint(0, len(qas)), side_qa)
            for qa in asked:
                counts[split][qa.qtype] = counts[split].get(qa.qtype, 0) + 1
            images[iid] = {"image": rel, "split": split, "background": list(background),
                           "shapes": [s.to_dict() for s in shapes], "caption": describe(shapes)}
            captions[split].append({"image": rel, "caption": describe(shapes)})
            if split == "train":
                llava[split].append(_llava_record(iid, rel, asked, single=False))
            else:
                llava[split].extend(_llava_record(f"{iid}_{qa.qtype}", rel, [qa], single=True) for qa in asked)
            pid = str(len(problems) + 1)
            problems[pid] = sqa_problem(rng, rng.choice(qas), split)
            sqa_sources[pid] = iid
            (out / "scienceqa" / "images" / pid).mkdir()
            (out / "scienceqa" / "images" / pid / "image.png").write_bytes(data)
            i += 1

    for split, count in (("train", n_ocr), ("test", n_ocr_test)):
        rng = random.Random(f"llama-adapter-synth/{seed}/ocr-{split}")
        i = 0
        while i < count:
            img, info = draw_word(rng, rng.choice(WORDS), image_size)
            key = (info["word"], info["font_size"], *info["box"])
            if key in seen:
                continue
            seen.add(key)
            iid = f"ocr_{split}_{i:06d}"
            rel = f"images/{iid}.png"
            (out / rel).write_bytes(png_bytes(img))
            images[iid] = {"image": rel, "split": split, **info}
            ocr[split].append(_llava_record(iid, rel, [QA("ocr", OCR_QUESTION, info["word"])], single=True))
            counts[split]["ocr"] = counts[split].get("ocr", 0) + 1
            i += 1

    paths = {name: out / name for name in OUTPUTS}
    _dump(paths["llava_train.json"], llava["train"])
    _dump(paths["llava_test.json"], llava["test"])
    _dump_lines(paths["captions_train.jsonl"], captions["train"])
    _dump_lines(paths["captions_test.jsonl"], captions["test"])
    _dump(paths["ocr_train.json"], ocr["train"])
    _dump(paths["ocr_test.json"], ocr["test"])
    _dump(paths["images.json"], images)
    _dump(out / "scienceqa" / "problems.json", problems)
    _dump(out / "scienceqa" / "pid_splits.json",
          {s: [p for p, v in problems.items() if v["split"] == s] for s in ("train", "test")})
    _dump(out / "scienceqa" / "sources.json", sqa_sources)
    summary = SynthSummary(
        out, seed, n, n_test, n_ocr, n_ocr_test, paths["llava_train.json"], paths["llava_test.json"],
        paths["captions_train.jsonl"], paths["captions_test.jsonl"], paths["ocr_train.json"],
        paths["ocr_test.json"], out / "scienceqa" / "problems.json", paths["meta.json"], paths["images.json"],
        test_records=len(llava["test"]), qtype_counts=counts)
    meta = {
        "format": "llama-adapter synthetic shapes v1", "seed": seed, "image_size": image_size,
        "counts": {"train_images": n, "test_images": n_test, "ocr_train": n_ocr, "ocr_test": n_ocr_test,
                   "llava_train_records": len(llava["train"]), "llava_test_records": len(llava["test"]),
                   "scienceqa_problems": len(problems), "qa": counts},
        "colours": {k: list(v) for k, v in COLOURS.items()}, "kinds": list(KINDS), "qtypes": list(QTYPES),
        "answer_formats": ANSWER_FORMATS, "reply_format": "answer capitalised with a final '.', OCR verbatim",
        "normalisation": "lower case, strip spaces and final .!?, number words to digits",
        "caption_format": CAPTION_FORMAT, "ocr_question": OCR_QUESTION, "ocr_vocabulary": WORDS,
    }
    _dump(paths["meta.json"], meta)  # written last: its presence marks a complete data set
    return summary


def summary_dict(s: SynthSummary) -> dict[str, Any]:
    """JSON-ready form of a summary (paths as strings), for the CLI to print."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}
