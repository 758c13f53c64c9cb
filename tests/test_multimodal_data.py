"""Multimodal readers, conversation encoding with label masks, and batch collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer
from PIL import Image

from llama_adapter.data.multimodal import (
    PLAIN_HUMAN,
    CaptionRecord,
    Conversation,
    MultimodalBatch,
    MultimodalExample,
    caption_conversation,
    collate_multimodal,
    encode_conversation,
    prompt_ids,
    read_captions,
    read_llava,
)
from llama_adapter.data.synth import synthesize
from llama_adapter.data.tokenize import IGNORE, Batch, Example, PromptTooLong, encode_pair
from llama_adapter.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(make_tokenizer())


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    return tmp_path


def write(folder: Path, records, name: str = "data.json") -> Path:
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def test_read_llava_tags_anywhere_text_only_and_meta(folder):
    path = write(folder, [
        {"id": "x", "image": "img/a.png", "qtype": "count", "answer": "1", "conversations": [
            turn("human", "What is this?\n<image>"), turn("gpt", "A red square."),
            turn("human", "How many?"), turn("gpt", "1.")]},
        {"image": "img/a.png", "conversations": [turn("human", "Look: <image> what colour?"), turn("gpt", "Red.")]},
        {"image": "img/a.png", "conversations": [turn("human", "<image>\nDescribe."), turn("gpt", "Red.")]},
        {"image": "img/a.png", "conversations": [turn("human", "No tag here."), turn("gpt", "Red.")]},
        {"conversations": [turn("user", "Say hi."), turn("assistant", "Hi.")]},
    ])
    convs = read_llava(path)
    assert [c.turns for c in convs] == [
        [("What is this?", "A red square."), ("How many?", "1.")],
        [("Look:\nwhat colour?", "Red.")],
        [("Describe.", "Red.")],
        [("No tag here.", "Red.")],
        [("Say hi.", "Hi.")],
    ]
    assert [c.image_tag for c in convs] == [True, True, True, False, False]
    assert all(c.image == folder / "img" / "a.png" for c in convs[:4]) and convs[4].image is None
    assert convs[0].meta == {"id": "x", "qtype": "count", "answer": "1"}
    assert convs[1].source == f"{path}#1"
    jsonl = write(folder, [{"image": "a.png", "conversations": [turn("human", "<image>q"), turn("gpt", "a")]}],
                  "d.jsonl")
    assert read_llava(jsonl, image_root=folder / "img")[0].image == folder / "img" / "a.png"


@pytest.mark.parametrize("record, error, match", [
    ({"conversations": [turn("gpt", "Hi."), turn("human", "Hello.")]}, ValueError,
     r"record 1 of .*data\.json.*turn 0 is from 'gpt', expected 'human'"),
    ({"conversations": [turn("human", "a"), turn("human", "b")]}, ValueError, r"record 1 of .*turn 1 is from 'human'"),
    ({"image": "img/a.png", "conversations": [turn("human", "a"), turn("gpt", "b"), turn("human", "<image> c"),
                                              turn("gpt", "d")]}, ValueError, r"record 1 of .*turn 2 contains <image>"),
    ({"conversations": [turn("human", "<image> a"), turn("gpt", "b")]}, ValueError,
     r"record 1 of .*contains <image> but the record has no 'image'"),
    ({"image": "img/a.png", "conversations": [turn("human", "<image><image>"), turn("gpt", "b")]}, ValueError,
     r"record 1 of .*2 times"),
    ({"conversations": [turn("human", "a"), turn("gpt", "b"), turn("human", "c")]}, ValueError,
     r"record 1 of .*no 'gpt' reply"),
    ({"conversations": []}, ValueError, r"record 1 of .*non-empty list"),
    ({"id": 7, "image": "img/missing.png", "conversations": [turn("human", "a"), turn("gpt", "b")]},
     FileNotFoundError, r"record 1 of .*data\.json \(id 7\): image file not found: .*img/missing\.png"),
])
def test_read_llava_errors_name_file_and_record(folder, record, error, match):
    ok = {"conversations": [turn("human", "fine"), turn("gpt", "fine")]}
    with pytest.raises(error, match=match):
        read_llava(write(folder, [ok, record]))


def test_missing_image_allowed_without_check(folder):
    path = write(folder, [{"image": "nope.png", "conversations": [turn("human", "a"), turn("gpt", "b")]}])
    assert read_llava(path, check_files=False)[0].image == folder / "nope.png"


def test_read_captions(folder):
    recs = [{"image": "img/a.png", "caption": "A red square."}]
    for name in ("c.jsonl", "c.json"):
        out = read_captions(write(folder, recs, name))
        assert out == [CaptionRecord(folder / "img" / "a.png", "A red square.", f"{folder / name}#0")]
    with pytest.raises(ValueError, match=r"record 1 of .*c2\.jsonl has no non-empty string field 'caption'"):
        read_captions(write(folder, recs + [{"image": "img/a.png", "caption": ""}], "c2.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"record 0 of .*image file not found"):
        read_captions(write(folder, [{"image": "b.png", "caption": "x"}], "c3.jsonl"))
    conv = caption_conversation(out[0])
    assert conv.image == out[0].image and conv.turns[0][1] == "A red square."


def trained_runs(ex) -> list[list[int]]:
    """Maximal runs of consecutive positions that carry a label."""
    runs, cur = [], []
    for t, label in zip(ex.input_ids, ex.labels):
        if label == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == t
            cur.append(t)
    return runs + ([cur] if cur else [])


CONV = Conversation(Path("x.png"), [("what colour is the circle?", "the circle is red"),
                                    ("how many?", "three"), ("say yes", "yes")], "conv#0")


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_labels_cover_exactly_the_replies(tok, template):
    ex = encode_conversation(tok, CONV, 256, template)
    assert isinstance(ex, MultimodalExample) and ex.image == CONV.image and ex.source == "conv#0"
    assert len(ex.input_ids) == len(ex.labels)
    runs = trained_runs(ex)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [
        f"{g}<|im_end|>" for _, g in CONV.turns]  # the tiny tokenizer's EOS is <|im_end|>
    text = tok.decode(ex.input_ids, skip_special_tokens=False)
    for human, _ in CONV.turns:
        assert human in text
    untrained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE], skip_special_tokens=False)
    assert all(g not in untrained for _, g in CONV.turns[:2])
    if template == "plain":
        assert text.startswith(PLAIN_HUMAN.format(text=CONV.turns[0][0]))
    else:
        assert text.startswith("<|im_start|>user\nwhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n")


def test_single_turn_chat_matches_encode_pair(tok):
    conv = Conversation(None, [("say hello", "hello world")], "c#0")
    ex = encode_conversation(tok, conv, 64, "chat", kind="instruction")
    prompt = tok.chat_prompt([{"role": "user", "content": "say hello"}])
    ref = encode_pair(tok, prompt, "hello world", 64, "c#0", add_special_tokens=False)
    assert (ex.input_ids, ex.labels, ex.kind) == (ref.input_ids, ref.labels, "instruction")


def test_image_placeholder_only_with_image(tok):
    marker = "Image: <image>\n"
    with_img = tok.decode(encode_conversation(tok, CONV, 256, "plain", marker).input_ids, skip_special_tokens=False)
    assert with_img.startswith("### Human: Image: <image>\nwhat colour") and with_img.count("<image>") == 1
    text_only = Conversation(None, CONV.turns, "t#0")
    assert "<image>" not in tok.decode(encode_conversation(tok, text_only, 256, "plain", marker).input_ids)
    assert "<image>" not in tok.decode(encode_conversation(tok, CONV, 256, "plain").input_ids)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_prompt_ids_match_training_layout(tok, template):
    ex = encode_conversation(tok, CONV, 256, template, "Image: ")
    history = CONV.turns[:2]
    ids = prompt_ids(tok, CONV.turns[2][0], template, "Image: ", True, history)
    assert ex.input_ids[: len(ids)] == ids and ex.labels[len(ids)] != IGNORE and ex.labels[len(ids) - 1] == IGNORE


def test_long_prompt_and_truncation(tok):
    n_prompt = len(prompt_ids(tok, CONV.turns[0][0], "chat", has_image=False))
    with pytest.raises(PromptTooLong, match=r"conv#0: the prompt alone is \d+ tokens"):
        encode_conversation(tok, CONV, n_prompt, "chat")
    ex = encode_conversation(tok, CONV, n_prompt + 3, "chat")
    assert len(ex.input_ids) == len(ex.labels) == n_prompt + 3
    assert sum(lab != IGNORE for lab in ex.labels) == 3
    with pytest.raises(ValueError, match="unknown template"):
        encode_conversation(tok, CONV, 64, "alpaca")


def test_collate_multimodal(tok, tmp_path):
    a = encode_conversation(tok, CONV, 256, "chat")
    b = encode_conversation(tok, Conversation(None, [("say yes", "yes")], "b#0"), 256, "chat")
    c = Example([5, 6, 7], [IGNORE, 6, 7], "c#0", "vqa")  # a plain text example: no image
    batch = collate_multimodal([a, b, c], tok.pad_id)
    assert isinstance(batch, MultimodalBatch) and isinstance(batch, Batch)
    width = len(a.input_ids)
    assert batch.input_ids.shape == batch.labels.shape == (3, width)
    assert batch.images == [CONV.image, None, None] and batch.has_image.tolist() == [True, False, False]
    assert batch.has_image.dtype == torch.bool and batch.kind == "vqa"
    assert batch.input_ids[1, len(b.input_ids):].eq(tok.pad_id).all()
    assert batch.labels[1, len(b.input_ids):].eq(IGNORE).all()
    assert batch.n_label_tokens == int((batch.labels[:, 1:] != IGNORE).sum())
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, MultimodalBatch) and moved.images == batch.images
    mixed = collate_multimodal([a, Example([1, 2], [IGNORE, 2], "d#0")], tok.pad_id)
    assert mixed.kind == "mixed"


def test_synthetic_data_reads_and_encodes(tok, tmp_path):
    s = synthesize(tmp_path, n=6, n_test=3, image_size=96, ocr_words=2)
    train, test = read_llava(s.llava_train), read_llava(s.llava_test)
    assert len(train) == 6 and all(c.image_tag and c.image.is_file() and len(c.turns) >= 2 for c in train)
    assert all(len(c.turns) == 1 and {"qtype", "answer"} <= c.meta.keys() for c in test)
    ex = encode_conversation(tok, train[0], 512, "chat")
    assert len(trained_runs(ex)) == len(train[0].turns)
