"""A synthetic visual instruction data set: coloured shapes and rendered words, with checkable answers.

Small CPU runs need images whose answers are unambiguous, learnable in minutes and checkable against the
pixels, so evaluation numbers mean something. Everything is drawn without anti-aliasing from seeded
generators and written without timestamps: the same seed gives byte-identical files (with the same Pillow
build, which brings its own FreeType for the text and zlib for the PNGs).

Answer formats (the `answer` field; the assistant turn is `reply_text(answer)`):
  colour, colour_of: a colour word ("red"); shape: a kind word ("circle"); count: a digit ("3");
  position, yes_no: "yes" or "no"; side: "left" or "right"; ocr: the word, lower case ("apple").
Compare a generated reply with `normalise_answer(reply) == answer`.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 30), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
KINDS = ("circle", "square", "triangle")
QTYPES = ("colour", "shape", "count", "position", "colour_of", "yes_no", "side", "ocr")
ANSWER_FORMATS = {
    "colour": "one colour word", "shape": "one shape word", "count": "a digit 1-4",
    "position": "yes or no", "colour_of": "one colour word", "yes_no": "yes or no", "side": "left or right",
    "ocr": "the word, lower case",
}
QUESTIONS = {
    "colour": ("What colour is the shape?", "What is the colour of the shape?"),
    "shape": ("What shape is it?", "What kind of shape is this?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "colour_of": ("What colour is the {kind}?", "What is the colour of the {kind}?"),
    "yes_no": ("Is there {name}?", "Does the image contain {name}?"),  # name with its article
    "side": ("Is the {name} on the left or the right of the image?", "Which side of the image is the {name} on?"),
}
OCR_QUESTION = "What word is written in the image?"
CAPTION_FORMAT = "all shapes named left to right: 'A red circle, a blue square and a green triangle.'"
SIZE_RANGE = (0.20, 0.35)  # shape side as a fraction of the image side: a few cells of a 7x7 feature grid
GAP = 4  # pixels between shape boxes
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
WORDS = (
    "about above after again air all also animal answer apple area ask away baby back ball bank bear bed bell "
    "best bird black blue boat body book box boy bread bring brown build cake call car card care cat chair "
    "child city class clean clock close cloud cold come cook corn cow cup dark day deep desk dog door down "
    "draw dream dress drink duck early earth east eat egg end eye face fall farm fast fire fish five flag "
    "floor flower fly food foot fox friend frog fruit game garden girl give glass gold good grass green hand "
    "happy hat head heart help hill home horse house ice idea iron jump key king kite lake lamp land large "
    "leaf left letter light line lion long map milk moon mouse music name near nest new night north nose "
    "ocean old open orange page paper park pen pig plant play queen quick rain read red ring river road rock "
    "room rose run salt sand school sea seed sheep ship shoe sing sky sleep small snow song south star stone "
    "street sun table tall tea tiger time top town train tree water west white wind window winter wolf wood "
    "word world year yellow young zebra"
).split()


@dataclass
class Shape:
    colour: str
    kind: str
    x0: int  # top-left corner of the bounding square
    y0: int
    size: int  # side of the bounding square, pixels

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1)."""
        return self.x0, self.y0, self.x0 + self.size - 1, self.y0 + self.size - 1

    @property
    def centre(self) -> tuple[int, int]:
        """A pixel inside the shape for every kind (the triangle included)."""
        return self.x0 + self.size // 2, self.y0 + self.size // 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def to_dict(self) -> dict[str, Any]:
        return {"colour": self.colour, "kind": self.kind, "centre": list(self.centre), "size": self.size,
                "box": list(self.box)}


@dataclass
class QA:
    qtype: str
    question: str
    answer: str  # canonical short answer, see the module docstring


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


def reply_text(answer: str, qtype: str = "") -> str:
    """The assistant turn for an answer: "Red.", "Yes.", "3."; OCR words verbatim (case matters there)."""
    return answer if qtype == "ocr" else answer[:1].upper() + answer[1:] + "."


def normalise_answer(text: str) -> str:
    """Lower case, no surrounding space or final punctuation, number words as digits ("Three." -> "3")."""
    t = text.strip().lower().rstrip(".!?").strip()
    return NUMBER_WORDS.get(t, t)


def with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def describe(shapes: list[Shape]) -> str:
    names = [with_article(s.name) for s in sorted(shapes, key=lambda s: (s.centre[0], s.centre[1]))]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + GAP < b[0] or b[2] + GAP < a[0] or a[3] + GAP < b[1] or b[3] + GAP < a[1]


def place_shapes(rng: random.Random, k: int, side: int) -> list[Shape]:
    """k shapes with distinct (colour, kind), non-overlapping boxes; redraws the whole set if one won't fit."""
    combos = [(c, kind) for c in COLOURS for kind in KINDS]
    lo, hi = round(SIZE_RANGE[0] * side), round(SIZE_RANGE[1] * side)
    while True:
        shapes: list[Shape] = []
        for colour, kind in rng.sample(combos, k):
            for _ in range(100):
                size = rng.randint(lo, hi)
                s = Shape(colour, kind, rng.randint(2, side - size - 2), rng.randint(2, side - size - 2), size)
                if all(_apart(s.box, t.box) for t in shapes):
                    shapes.append(s)
                    break
            else:
                break
        if len(shapes) == k:
            return shapes


def draw_shapes(shapes: list[Shape], side: int, background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (side, side), background)
    d = ImageDraw.Draw(img)
    for s in shapes:
        x0, y0, x1, y1 = s.box
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def _position_qa(rng: random.Random, shapes: list[Shape]) -> QA | None:
    """A yes/no left/right question about two shapes whose boxes do not overlap horizontally."""
    pairs = [(a, b) for a in shapes for b in shapes if a.box[2] < b.box[0]]  # a wholly left of b
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    truth = rng.random() < 0.5
    if rng.random() < 0.5:
        first, second, rel = (a, b, "left") if truth else (b, a, "left")
    else:
        first, second, rel = (b, a, "right") if truth else (a, b, "right")
    return QA("position", f"Is the {first.name} to the {rel} of the {second.name}?", "yes" if truth else "no")


def _yes_no_qa(rng: random.Random, shapes: list[Shape]) -> QA:
    """Balanced: half ask about a present shape, half about an absent one sharing its colour or kind."""
    template = rng.choice(QUESTIONS["yes_no"])
    present = {(s.colour, s.kind) for s in shapes}
    if rng.random() < 0.5:
        return QA("yes_no", template.format(name=with_article(rng.choice(shapes).name)), "yes")
    near = sorted({(c, k) for c in COLOURS for k in KINDS for s in shapes if c == s.colour or k == s.kind} - present)
    colour, kind = rng.choice(near)
    return QA("yes_no", template.format(name=with_article(f"{colour} {kind}")), "no")


def _side_qa(rng: random.Random, shapes: list[Shape], side: int) -> QA | None:
    """Which half of the image one shape lies in (its box wholly in that half); left and right equally often.

    One shape and the image's own frame: what a grid of tokens keeps and one pooled vector mostly loses
    (bench/grid_probe.py: 89.6% vs 61.8%), without the two-shape relation of `position`. Not among the
    ScienceQA-style problems, which are drawn from the other questions so that they stay as they were."""
    halves = {"left": [s for s in shapes if 2 * s.box[2] < side], "right": [s for s in shapes if 2 * s.box[0] >= side]}
    answers = [a for a in ("left", "right") if halves[a]]
    if not answers:
        return None
    answer = rng.choice(answers)
    shape = rng.choice(halves[answer])
    return QA("side", rng.choice(QUESTIONS["side"]).format(name=shape.name), answer)


def make_questions(rng: random.Random, shapes: list[Shape]) -> list[QA]:
    n = len(shapes)
    qas = []
    if n == 1:
        qas.append(QA("colour", rng.choice(QUESTIONS["colour"]), shapes[0].colour))
        qas.append(QA("shape", rng.choice(QUESTIONS["shape"]), shapes[0].kind))
    qas.append(QA("count", rng.choice(QUESTIONS["count"]), str(n)))
    if n >= 2:
        pos = _position_qa(rng, shapes)
        if pos:
            qas.append(pos)
        unique = [k for k in KINDS if sum(s.kind == k for s in shapes) == 1]
        if unique:
            kind = rng.choice(unique)
            colour = next(s.colour for s in shapes if s.kind == kind)
            qas.append(QA("colour_of", rng.choice(QUESTIONS["colour_of"]).format(kind=kind), colour))
    qas.append(_yes_no_qa(rng, shapes))
    return qas


_FONTS: dict[int, Any] = {}


def _font(size: int) -> Any:
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (ImportError, TypeError, OSError) as e:
            raise RuntimeError(f"OCR images need Pillow >= 10.1 built with FreeType "
                               f"(ImageFont.load_default(size=...)): {e}") from e
    return _FONTS[size]


def draw_word(rng: random.Random, word: str, side: int) -> tuple[Image.Image, dict[str, Any]]:
    """Black text on white, binary (no anti-aliasing), random size and position that fit the image."""
    size = rng.randint(round(0.12 * side), round(0.22 * side))
    img = Image.new("RGB", (side, side), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.fontmode = "1"
    while True:
        left, top, right, bottom = d.textbbox((0, 0), word, font=_font(size))
        if right - left <= side - 8 and bottom - top <= side - 8:
            break
        size -= 2
    x = rng.randint(4, side - 4 - (right - left)) - left
    y = rng.randint(4, side - 4 - (bottom - top)) - top
    d.text((x, y), word, fill=(0, 0, 0), font=_font(size))
    ink = ImageOps.invert(img.convert("L")).getbbox()  # the drawn pixels, exclusive right/bottom
    assert ink is not None, word
    return img, {"word": word, "font_size": size, "box": [ink[0], ink[1], ink[2] - 1, ink[3] - 1]}  # inclusive


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


SQA_CATEGORY = {"colour": "Identify colours", "colour_of": "Identify colours", "shape": "Identify shapes",
                "count": "Count objects", "position": "Spatial relations", "yes_no": "Find objects"}


def sqa_problem(rng: random.Random, qa: QA, split: str) -> dict[str, Any]:
    """A ScienceQA-format multiple-choice problem (2-4 choices) for one question about an image."""
    if qa.qtype in ("position", "yes_no"):
        choices = ["yes", "no"]
    else:
        pool = {"colour": list(COLOURS), "colour_of": list(COLOURS), "shape": list(KINDS),
                "count": ["1", "2", "3", "4"]}[qa.qtype]
        others = [c for c in pool if c != qa.answer]
        choices = [qa.answer] + rng.sample(others, rng.randint(1, min(3, len(others))))
        rng.shuffle(choices)
    return {
        "question": qa.question, "choices": choices, "answer": choices.index(qa.answer), "hint": "",
        "image": "image.png", "task": "yes or no" if choices == ["yes", "no"] else "closed choice",
        "grade": "grade1", "subject": "natural science", "topic": "shapes", "category": SQA_CATEGORY[qa.qtype],
        "skill": qa.qtype, "lecture": None, "solution": None, "split": split,
    }


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
