"""Every data loader validates each record while loading (property-based, with hypothesis).

Generated malformed records (missing or mistyped fields, empty or over-long strings, bad UTF-8, missing,
undecodable or escaping images, conversations that do not alternate, records that are not objects) never
produce anything but the loader's own DataError, with the record index in its message; well-formed
generated records always load; `on_bad_record: skip` leaves out exactly the bad record.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llama_adapter.data.formats import read_alpaca
from llama_adapter.data.multimodal import read_captions, read_llava
from llama_adapter.data.sources import DataConfig
from llama_adapter.data.validate import MAX_TEXT_CHARS, DataError, MissingDataFile

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
IMAGES = ("a.png", "sub/b.png")

# text without surrogates or NUL, with something visible in it
clean_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
words = st.text(clean_chars, min_size=1, max_size=20).filter(lambda s: s.strip() and "<image>" not in s)
any_text = st.text(clean_chars, max_size=20).filter(lambda s: "<image>" not in s)
not_strings = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.just("k"), st.integers(), max_size=1))
BAD_BYTE = "\udcff"  # written with surrogateescape: the raw byte 0xff on disk, which is not UTF-8
LONE_SURROGATE = "\ud800"  # written as the JSON escape \ud800: valid JSON, not valid text


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("validation")
    for name in IMAGES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (200, 30, 30)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (4, 4)).save(folder.parent / "outside.png")  # exists: only the escape check can refuse it
    return folder


def write(folder: Path, records: list, suffix: str, escape: bool = False) -> Path:
    """A JSON list or JSON Lines file; strings holding BAD_BYTE become raw non-UTF-8 bytes."""
    path = folder / f"data{suffix}"
    if suffix == ".jsonl":
        body = "".join(json.dumps(r, ensure_ascii=escape) + "\n" for r in records)
    else:
        body = json.dumps(records, ensure_ascii=escape)
    path.write_bytes(body.encode("utf-8", errors="surrogateescape"))
    return path


# -- well-formed records -------------------------------------------------------------------------------------

alpaca_records = st.fixed_dictionaries({"instruction": words, "output": words},
                                       optional={"input": st.one_of(st.none(), any_text)})
caption_records = st.fixed_dictionaries({"image": st.sampled_from(IMAGES), "caption": words})


@st.composite
def llava_records(draw):
    n = draw(st.integers(1, 3))
    image = draw(st.one_of(st.none(), st.sampled_from(IMAGES)))
    turns = []
    for j in range(n):
        human = draw(words)
        if j == 0 and image is not None and draw(st.booleans()):
            human = "<image>\n" + human
        turns += [{"from": draw(st.sampled_from(["human", "user"])), "value": human},
                  {"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(words)}]
    record = {"conversations": turns}
    if image is not None:
        record["image"] = image
    if draw(st.booleans()):
        record["id"] = draw(st.one_of(st.integers(0, 99), words))
    return record


LOADERS = {
    "alpaca": (alpaca_records, lambda path, root, bad="error": read_alpaca(path, on_bad_record=bad)),
    "llava": (llava_records(), lambda path, root, bad="error": read_llava(path, image_root=root, on_bad_record=bad)),
    "captions": (caption_records,
                 lambda path, root, bad="error": read_captions(path, image_root=root, on_bad_record=bad)),
}


@pytest.mark.parametrize("fmt", sorted(LOADERS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@SETTINGS
@given(data=st.data())
def test_well_formed_records_always_load(root, fmt, suffix, data):
    strategy, load = LOADERS[fmt]
    records = data.draw(st.lists(strategy, min_size=1, max_size=5))
    loaded = load(write(root, records, suffix), root)
    assert len(loaded) == len(records)
    if fmt == "alpaca":
        assert [(r.instruction, r.input, r.output) for r in loaded] == [
            (r["instruction"], r.get("input") or "", r["output"]) for r in records]
    if fmt == "captions":
        assert [(r.image, r.caption) for r in loaded] == [(root / r["image"], r["caption"]) for r in records]
    if fmt == "llava":
        assert [len(c.turns) for c in loaded] == [len(r["conversations"]) // 2 for r in records]
        assert [c.image for c in loaded] == [root / r["image"] if "image" in r else None for r in records]


# -- malformed records -----------------------------------------------------------------------------------------


def text_breakage(value_ok: str):
    """Ways to break a required, non-empty string field: (new value, or DELETE; how the file is written)."""
    return st.one_of(
        st.tuples(st.just(DELETE), st.just(False)),
        st.tuples(not_strings, st.just(False)),
        st.tuples(st.sampled_from(["", "   ", "\n\t"]), st.just(False)),
        st.tuples(st.just("x" * (MAX_TEXT_CHARS + 1)), st.just(False)),
        st.tuples(st.just(value_ok + BAD_BYTE), st.just(False)),  # raw 0xff in the file
        st.tuples(st.just(value_ok + LONE_SURROGATE), st.just(True)),  # \ud800 escape
        st.tuples(st.just(value_ok + "\0"), st.just(True)),
    )


DELETE = object()
ABSOLUTE = "<the absolute path of an image that exists>"


def image_breakage():
    return st.one_of(
        st.tuples(st.sampled_from(["missing.png", "sub/none.png", "broken.png", "notes.txt", "../outside.png",
                                   "sub/../../outside.png", ABSOLUTE, "C:\\images\\a.png", "sub\\..\\..\\outside.png",
                                   "", " "]), st.just(False)),
        st.tuples(not_strings.filter(lambda v: v is not None), st.just(False)),
        st.tuples(st.just("a.png" + BAD_BYTE), st.just(False)),
    )


def set_field(record: dict, key: str, value) -> dict:
    record = json.loads(json.dumps(record))
    if value is DELETE:
        record.pop(key, None)
    else:
        record[key] = value
    return record


@st.composite
def broken_alpaca(draw):
    record = draw(alpaca_records)
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(not_strings, words, st.none())), False  # not an object at all
    key = draw(st.sampled_from(["instruction", "output", "input"]))
    value, escape = draw(text_breakage("ok"))
    if key == "input" and (value is DELETE or (isinstance(value, str) and not value.strip())):
        value, escape = 7, False  # input may be missing or empty, but not a number
    return set_field(record, key, value), escape


@st.composite
def broken_captions(draw):
    record = draw(caption_records)
    if draw(st.booleans()):
        value, escape = draw(text_breakage("ok"))
        return set_field(record, "caption", value), escape
    value, escape = draw(image_breakage())
    return set_field(record, "image", value), escape


@st.composite
def broken_llava(draw):
    record = draw(llava_records())
    turns = record["conversations"]
    how = draw(st.sampled_from(["conversations", "order", "trailing", "reply", "value type", "tag", "image",
                                "bad text"]))
    escape = False
    if how == "conversations":
        record["conversations"] = draw(st.one_of(st.just([]), not_strings.filter(lambda v: v != [])))
    elif how == "order":
        j = draw(st.integers(0, len(turns) - 1))
        turns[j]["from"] = draw(st.sampled_from(["gpt", "human", "system", "robot"]).filter(
            lambda r: r != ("human" if j % 2 == 0 else "gpt")))
    elif how == "trailing":
        turns.append({"from": "human", "value": "and?"})
    elif how == "reply":
        turns[draw(st.integers(0, len(turns) // 2 - 1)) * 2 + 1]["value"] = draw(st.sampled_from(["", "  "]))
    elif how == "value type":
        turns[draw(st.integers(0, len(turns) - 1))]["value"] = draw(not_strings)
    elif how == "tag":
        if len(turns) > 2:
            turns[2]["value"] = "<image> " + turns[2]["value"]
        else:
            record.pop("image", None)
            turns[0]["value"] = "<image> " + turns[0]["value"]
    elif how == "image":
        value, escape = draw(image_breakage())
        record["image"] = value
    else:
        value, escape = draw(text_breakage("ok").filter(lambda v: isinstance(v[0], str) and v[0].strip()))
        turns[draw(st.integers(0, len(turns) - 1))]["value"] = value
    return record, escape


BROKEN = {"alpaca": broken_alpaca(), "llava": broken_llava(), "captions": broken_captions()}


@pytest.mark.parametrize("fmt", sorted(LOADERS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@SETTINGS
@given(data=st.data())
def test_a_malformed_record_is_a_data_error_naming_its_index(root, fmt, suffix, data, caplog):
    strategy, load = LOADERS[fmt]
    good = data.draw(st.lists(strategy, min_size=1, max_size=4))
    bad, escape = data.draw(BROKEN[fmt])
    if isinstance(bad, dict) and bad.get("image") == ABSOLUTE:
        bad["image"] = str(root / "a.png")  # exists and decodes: only the absolute-path check can refuse it
    k = data.draw(st.integers(0, len(good)))
    records = good[:k] + [bad] + good[k:]
    path = write(root, records, suffix, escape)
    with pytest.raises(DataError) as err:  # nothing else: no KeyError, TypeError, UnicodeError, PIL error ...
        load(path, root)
    assert f"record {k} of {path}" in str(err.value)
    assert err.value.index == k and Path(err.value.path) == path

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llama_adapter.data.validate"):
        kept = load(path, root, "skip")
    assert len(kept) == len(good)
    assert f"record {k} of {path}" in caplog.text and "skipped 1 bad record(s)" in caplog.text


def test_a_jsonl_line_that_is_not_json_is_named_and_can_be_skipped(root):
    path = root / "lines.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(DataError, match=r"lines.jsonl:2: not valid JSON \(record 1 of"):
        read_alpaca(path)
    assert [r.instruction for r in read_alpaca(path, on_bad_record="skip")] == ["a", "c"]


def test_specific_messages_name_the_field(root):
    cases = [
        ({"instruction": "a", "output": 3}, ".json", "record 0 of .*: field 'output' must be a string, got int"),
        ({"instruction": "a", "output": " "}, ".json", "record 0 of .* has no non-empty string field 'output'"),
        ({"instruction": "a" * (MAX_TEXT_CHARS + 1), "output": "b"}, ".json",
         f"field 'instruction' is {MAX_TEXT_CHARS + 1:,} characters long"),
        ({"instruction": "a" + BAD_BYTE, "output": "b"}, ".jsonl", "field 'instruction' is not valid UTF-8"),
    ]
    for record, suffix, match in cases:
        with pytest.raises(DataError, match=match):
            read_alpaca(write(root, [record], suffix))
    turn = lambda who, v: {"from": who, "value": v}  # noqa: E731
    for image, match in [("../a.png", r"field 'image' \('../a.png'\) escapes the image root"),
                         ("/etc/hostname", "field 'image' is an absolute path"),
                         ("broken.png", "broken.png is not a decodable image"),
                         ("gone.png", "image file not found")]:
        path = write(root, [{"image": image, "conversations": [turn("human", "q"), turn("gpt", "a")]}], ".json")
        with pytest.raises(DataError, match=match) as err:
            read_llava(path, image_root=root)
        assert err.value.field == "image"
    with pytest.raises(MissingDataFile):  # a missing image is also a FileNotFoundError, as before
        read_captions(write(root, [{"image": "gone.png", "caption": "x"}], ".jsonl"), image_root=root)
    with pytest.raises(DataError, match=r"field 'conversations\[1\].value' is empty|conversations\[1\].value"):
        read_llava(write(root, [{"conversations": [turn("human", "q"), turn("gpt", "")]}], ".json"))


def test_on_bad_record_is_validated():
    with pytest.raises(ValueError, match="on_bad_record must be one of error, skip"):
        DataConfig(train="x.json", on_bad_record="ignore")


def test_the_synthetic_set_loads_through_every_validating_loader(tmp_path):
    from llama_adapter.data.synth import synthesize

    s = synthesize(tmp_path / "synth", 6, n_test=2, image_size=64, ocr_words=2)
    assert len(read_llava(s.llava_train)) > 0 and len(read_llava(s.ocr_train)) > 0
    assert len(read_captions(s.captions_train)) == 6
    record = json.loads(s.llava_train.read_text())
    record[1]["image"] = "../" + record[1]["image"]
    s.llava_train.write_text(json.dumps(record))
    with pytest.raises(DataError, match=f"record 1 of {s.llava_train}"):
        read_llava(s.llava_train)


# -- ScienceQA problems.json: an object pid -> problem; the record index is the problem's position ---------------

SUBJECTS = ["natural science", "social science", "language science"]


@st.composite
def sqa_problems(draw):
    choices = draw(st.lists(words, min_size=2, max_size=5))
    problem = {"question": draw(words), "choices": choices, "answer": draw(st.integers(0, len(choices) - 1)),
               "hint": draw(st.one_of(st.none(), any_text)), "subject": draw(st.sampled_from(SUBJECTS)),
               "grade": f"grade{draw(st.integers(1, 12))}", "image": draw(st.sampled_from([None, "image.png"]))}
    if draw(st.booleans()):
        problem["lecture"], problem["solution"] = draw(any_text), draw(st.one_of(st.none(), any_text))
    return problem


@st.composite
def broken_sqa(draw):
    problem = draw(sqa_problems())
    how = draw(st.sampled_from(["question", "choices", "answer", "subject", "grade", "hint", "image", "object"]))
    escape = False
    if how == "question":
        value, escape = draw(text_breakage("why"))
        problem = set_field(problem, "question", value)
    elif how == "choices":
        problem["choices"] = draw(st.one_of(st.just(["only one"]), not_strings, st.just(["a", 3]), st.just(["a", ""]),
                                            st.just(["a", "b" + BAD_BYTE])))
    elif how == "answer":
        problem["answer"] = draw(st.one_of(st.just(len(problem["choices"])), st.just(-1), st.just(True),
                                           st.just("A"), st.none()))
    elif how == "subject":
        problem["subject"] = draw(st.one_of(st.just("chemistry"), st.none(), st.integers()))
    elif how == "grade":
        problem["grade"] = draw(st.sampled_from(["grade0", "grade13", "first", None, 3.5]))
    elif how == "hint":
        problem["hint"] = draw(not_strings.filter(lambda v: v not in (0, 0.0, False, [], {})))
    elif how == "image":
        problem["image"] = draw(st.sampled_from(["missing.png", "broken.png", "../image.png", "/etc/hostname", 7]))
    else:
        problem = draw(st.one_of(not_strings, words))
    return problem, escape


@pytest.fixture(scope="module")
def sqa_root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sqa")
    for i in range(8):
        (folder / "images" / f"p{i}").mkdir(parents=True)
        Image.new("RGB", (4, 4), (0, 90, 0)).save(folder / "images" / f"p{i}" / "image.png")
        (folder / "images" / f"p{i}" / "broken.png").write_bytes(b"GIF89a broken")
    return folder


def write_sqa(folder: Path, problems: list, escape: bool = False) -> Path:
    path = folder / "problems.json"
    body = json.dumps({f"p{i}": p for i, p in enumerate(problems)}, ensure_ascii=escape)
    path.write_bytes(body.encode("utf-8", errors="surrogateescape"))
    return path


@SETTINGS
@given(problems=st.lists(sqa_problems(), min_size=1, max_size=6))
def test_well_formed_scienceqa_problems_always_load(sqa_root, problems):
    from llama_adapter.eval.scienceqa import load_scienceqa

    loaded = load_scienceqa(write_sqa(sqa_root, problems), sqa_root / "images")
    assert [(p.question, p.choices, p.answer) for p in loaded] == [
        (p["question"], p["choices"], p["answer"]) for p in problems]
    assert [p.image is not None for p in loaded] == [p["image"] is not None for p in problems]


@SETTINGS
@given(data=st.data())
def test_a_malformed_scienceqa_problem_is_a_data_error_naming_its_index(sqa_root, data):
    from llama_adapter.eval.scienceqa import load_scienceqa

    good = data.draw(st.lists(sqa_problems(), min_size=1, max_size=5))
    bad, escape = data.draw(broken_sqa())
    k = data.draw(st.integers(0, len(good)))
    path = write_sqa(sqa_root, good[:k] + [bad] + good[k:], escape)
    with pytest.raises(DataError) as err:
        load_scienceqa(path, sqa_root / "images")
    assert f"record {k} of {path}" in str(err.value) and err.value.index == k
    assert len(load_scienceqa(path, sqa_root / "images", on_bad_record="skip")) == len(good)


def test_recipe_option_on_bad_record_skip_reaches_the_loader(tiny, tmp_path, caplog):
    from llama_adapter.data import load_source

    _, tok = tiny
    path = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "say hello", "output": "hello"}, {"instruction": "", "output": "x"},
            {"instruction": "say yes", "output": 1}, {"instruction": "count", "output": "one two"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=f"record 1 of {path} has no non-empty string field 'instruction'"):
        load_source(DataConfig(train=str(path)), tok)
    with caplog.at_level(logging.WARNING, logger="llama_adapter.data.validate"):
        train, _ = load_source(DataConfig(train=str(path), on_bad_record="skip"), tok)
    assert [ex.source for ex in train] == [f"{path}#0", f"{path}#3"]
    assert "record 1 of" in caplog.text and "record 2 of" in caplog.text and "skipped 2 bad record(s)" in caplog.text
