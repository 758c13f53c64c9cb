"""The synthetic shapes data set: determinism, counts, and answers that agree with metadata and pixels."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llama_adapter.data.multimodal import read_captions, read_llava
from llama_adapter.data.synth import COLOURS, KINDS, QTYPES, WORDS, normalise_answer, reply_text, synthesize

SIZE = 128
SQA_FIELDS = {"question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic", "category",
              "skill", "lecture", "solution", "split"}


def run(path: Path, seed: int = 0):
    return synthesize(path, n=40, seed=seed, n_test=24, image_size=SIZE, ocr_words=8)


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = run(root / "a")
    return root, summary


def load(summary, name):
    return json.loads((summary.out_dir / name).read_text())


def test_same_seed_identical_other_seed_different(synth, tmp_path):
    root, summary = synth
    first = hashes(summary.out_dir)
    run(tmp_path / "b")
    assert hashes(tmp_path / "b") == first
    other = hashes(run(tmp_path / "c", seed=1).out_dir)
    assert other.keys() == first.keys()
    assert other["llava_train.json"] != first["llava_train.json"]
    assert other["images/train_000000.png"] != first["images/train_000000.png"]


def test_refuses_to_mix_with_existing_data(tmp_path):
    run(tmp_path)
    before = hashes(tmp_path)
    with pytest.raises(FileExistsError, match="already holds"):
        run(tmp_path)
    synthesize(tmp_path, n=40, seed=0, n_test=24, image_size=SIZE, ocr_words=8, overwrite=True)
    assert hashes(tmp_path) == before


def test_layout_and_counts(synth):
    _, s = synth
    train, test = load(s, "llava_train.json"), load(s, "llava_test.json")
    assert (s.n_train, s.n_test, s.n_ocr_train, s.n_ocr_test) == (40, 24, 8, 5)
    assert len(train) == 40 and len(test) == s.test_records
    assert len(list((s.out_dir / "images").glob("*.png"))) == 40 + 24 + 8 + 5
    for r in train:
        conv = r["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and len(conv) == 2 * len(r["qtypes"]) >= 4
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum("<image>" in c["value"] for c in conv) == 1
    for r in test:
        assert len(r["conversations"]) == 2 and r["qtype"] in QTYPES
        assert normalise_answer(r["conversations"][1]["value"]) == r["answer"]
    assert {r["qtype"] for r in test} == set(QTYPES) - {"ocr"}
    assert Counter(r["qtype"] for r in test) == Counter({k: v for k, v in s.qtype_counts["test"].items()
                                                         if k != "ocr"})
    assert len(read_captions(s.captions_train)) == 40 and len(read_captions(s.captions_test)) == 24
    assert len(read_llava(s.ocr_train)) == 8 and len(read_llava(s.ocr_test)) == 5
    meta = load(s, "meta.json")
    assert meta["seed"] == 0 and meta["kinds"] == list(KINDS) and set(meta["colours"]) == set(COLOURS)
    assert meta["counts"]["llava_test_records"] == len(test)


def test_yes_no_balanced(synth):
    _, s = synth
    answers = [t for r in load(s, "llava_train.json") for q, t in zip(r["qtypes"], r["conversations"][1::2])
               if q in ("yes_no", "position")]
    share = sum(normalise_answer(a["value"]) == "yes" for a in answers) / len(answers)
    assert 0.3 < share < 0.7


def without_side(records: list[dict]) -> list[dict]:
    """The records as they were before the side question existed: its turns and test records removed."""
    kept = []
    for r in records:
        if r.get("qtype") == "side":
            continue
        if "qtypes" in r:
            turns = list(zip(r["qtypes"], r["conversations"][0::2], r["conversations"][1::2]))
            at = next((i for i, t in enumerate(turns) if t[0] == "side"), None)
            if at is not None:
                image_tag = turns[at][1]["value"].startswith("<image>\n")
                del turns[at]
                if image_tag:  # a new turn dict: the loaded record stays as read
                    qtype, human, gpt = turns[0]
                    turns[0] = (qtype, {**human, "value": "<image>\n" + human["value"]}, gpt)
            r = {**r, "qtypes": [t[0] for t in turns], "conversations": [c for t in turns for c in t[1:]]}
        kept.append(r)
    return kept


def test_side_question_leaves_earlier_questions_unchanged(synth):
    """Adding `side` (own generator) kept every image and question of the earlier sets: these hashes are
    those of this fixture's files written by the generator before the side question was added."""
    _, s = synth
    before = {"llava_train.json": "3071680534fcae3c5b40697c341df8aec9a62fc7e6cb90c4151b22b8414652dc",
              "llava_test.json": "9ab250c9bec23cd421243bf0d6fe807ec8ffceebe29608ed50c68cb23b065ae8"}
    for name, digest in before.items():
        records = load(s, name)
        assert any("side" in r.get("qtypes", [r.get("qtype")]) for r in records)
        stripped = json.dumps(without_side(records), sort_keys=True).encode()
        assert hashlib.sha256(stripped).hexdigest() == digest, name
    sides = [r["answer"] for r in load(s, "llava_test.json") if r["qtype"] == "side"]
    assert set(sides) == {"left", "right"}


def pixels(s, rel: str) -> np.ndarray:
    return np.asarray(Image.open(s.out_dir / rel).convert("RGB"))


def rgb(px: np.ndarray, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in px[y, x])


def n_blobs(px: np.ndarray, background: tuple[int, ...]) -> int:
    """Connected regions of non-background pixels (4-neighbourhood)."""
    todo = {(int(y), int(x)) for y, x in zip(*np.nonzero((px != background).any(axis=2)))}
    blobs = 0
    while todo:
        blobs += 1
        stack = [todo.pop()]
        while stack:
            y, x = stack.pop()
            for nb in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if nb in todo:
                    todo.remove(nb)
                    stack.append(nb)
    return blobs


def expected(qtype: str, question: str, shapes: list[dict]) -> str:
    """The answer, worked out from the shape metadata independently of the generator."""
    names = {f"{s['colour']} {s['kind']}": s for s in shapes}
    if qtype == "colour":
        assert len(shapes) == 1
        return shapes[0]["colour"]
    if qtype == "shape":
        assert len(shapes) == 1
        return shapes[0]["kind"]
    if qtype == "count":
        return str(len(shapes))
    if qtype == "colour_of":
        kind = re.search(r"colour of the (\w+)\?|colour is the (\w+)\?", question)
        kind = kind.group(1) or kind.group(2)
        match = [s for s in shapes if s["kind"] == kind]
        assert len(match) == 1, "colour_of asked about a kind that is not unique"
        return match[0]["colour"]
    if qtype == "yes_no":
        name = re.search(r"(?:Is there|contain) an? (\w+ \w+)\?", question).group(1)
        return "yes" if name in names else "no"
    if qtype == "position":
        a, rel, b = re.fullmatch(r"Is the (\w+ \w+) to the (left|right) of the (\w+ \w+)\?", question).groups()
        a, b = names[a], names[b]
        left, right = (a, b) if a["box"][2] < b["box"][0] else (b, a)
        assert left["box"][2] < right["box"][0], "position asked about shapes that overlap horizontally"
        return "yes" if (rel == "left") == (left is a) else "no"
    if qtype == "side":
        shape = names[re.search(r"the (\w+ \w+) on", question).group(1)]
        x0, _, x1, _ = shape["box"]
        assert x1 < SIZE / 2 or x0 >= SIZE / 2, "side asked about a shape across the middle"
        return "left" if x1 < SIZE / 2 else "right"
    raise AssertionError(qtype)


def check_pixels(px: np.ndarray, info: dict) -> None:
    bg = tuple(info["background"])
    assert n_blobs(px, bg) == len(info["shapes"])
    for sh in info["shapes"]:
        x0, y0, x1, y1 = sh["box"]
        colour = COLOURS[sh["colour"]]
        assert rgb(px, *sh["centre"]) == colour
        corners = {"top-left": rgb(px, x0, y0), "bottom-left": rgb(px, x0, y1)}
        want = {"circle": (bg, bg), "square": (colour, colour), "triangle": (bg, colour)}[sh["kind"]]
        assert (corners["top-left"], corners["bottom-left"]) == want, sh


def test_answers_agree_with_metadata_and_pixels(synth):
    _, s = synth
    images = load(s, "images.json")
    for name in ("llava_test.json", "llava_train.json"):
        for r in load(s, name):
            info = images[Path(r["image"]).stem]
            px = pixels(s, r["image"])
            check_pixels(px, info)
            conv = r["conversations"]
            qtypes = [r["qtype"]] if "qtype" in r else r["qtypes"]
            for qtype, q, a in zip(qtypes, conv[0::2], conv[1::2]):
                answer = expected(qtype, q["value"].removeprefix("<image>\n"), info["shapes"])
                assert normalise_answer(a["value"]) == answer
                if qtype in ("colour", "colour_of"):
                    shape = next(sh for sh in info["shapes"] if sh["colour"] == answer)
                    assert rgb(px, *shape["centre"]) == COLOURS[answer]
            if "answer" in r:
                assert r["answer"] == expected(r["qtype"], conv[0]["value"].removeprefix("<image>\n"),
                                               info["shapes"])


def test_captions_name_shapes_left_to_right(synth):
    _, s = synth
    images = load(s, "images.json")
    for rec in read_captions(s.captions_test):
        shapes = sorted(images[rec.image.stem]["shapes"], key=lambda sh: sh["centre"])
        found = re.findall(r"\b[Aa]n? (\w+) (\w+)", rec.caption)
        assert found == [(sh["colour"], sh["kind"]) for sh in shapes]


def test_ocr_words_are_drawn(synth):
    _, s = synth
    images = load(s, "images.json")
    for path in (s.ocr_train, s.ocr_test):
        for r in json.loads(path.read_text()):
            info = images[Path(r["image"]).stem]
            assert r["qtype"] == "ocr" and r["answer"] == info["word"] in WORDS
            assert r["conversations"][1]["value"] == reply_text(r["answer"], "ocr") == r["answer"]
            px = pixels(s, r["image"])
            assert set(np.unique(px.reshape(-1, 3), axis=0).sum(axis=1).tolist()) == {0, 765}  # binary
            dark = (px.sum(axis=2) == 0)
            x0, y0, x1, y1 = info["box"]
            assert 4 <= x0 < x1 < SIZE - 4 and 4 <= y0 < y1 < SIZE - 4
            assert dark[y0:y1 + 1, x0:x1 + 1].sum() == dark.sum() > 20


def test_test_images_disjoint_from_train(synth):
    _, s = synth
    h = hashes(s.out_dir / "images")
    train = {v for k, v in h.items() if "train" in k}
    test = {v for k, v in h.items() if "test" in k}
    assert len(train) == 48 and len(test) == 29 and not train & test


def test_scienceqa_problems(synth):
    _, s = synth
    problems = load(s, "scienceqa/problems.json")
    sources = load(s, "scienceqa/sources.json")
    images = load(s, "images.json")
    assert len(problems) == 64 and Counter(p["split"] for p in problems.values()) == {"train": 40, "test": 24}
    for pid, p in problems.items():
        assert set(p) == SQA_FIELDS and p["image"] == "image.png" and p["hint"] == ""
        assert p["lecture"] is None and p["solution"] is None and p["subject"] == "natural science"
        assert 2 <= len(p["choices"]) <= 4 and len(set(p["choices"])) == len(p["choices"])
        info = images[sources[pid]]
        img = s.out_dir / "scienceqa" / "images" / pid / "image.png"
        assert img.read_bytes() == (s.out_dir / info["image"]).read_bytes()
        assert p["split"] == info["split"]
        assert p["choices"][p["answer"]] == expected(p["skill"], p["question"], info["shapes"])
