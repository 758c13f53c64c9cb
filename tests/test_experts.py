"""Expert models: OCR (real, offline), precomputed texts, callables, and the context slot."""

from __future__ import annotations

import json

import pytest

import llama_adapter as la
from llama_adapter.data.synth import synthesize
from llama_adapter.experts import CallableExpert, PrecomputedExpert, expert_prompt_ids, load_expert, with_context


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    s = synthesize(tmp_path_factory.mktemp("ocr"), 4, seed=11, n_test=1, ocr_words=3)
    return json.loads(s.ocr_train.read_text()), s.out_dir


def test_ocr_expert_reads_rendered_words(words):
    records, root = words
    ocr = load_expert("ocr")
    for r in records:
        assert ocr.describe(root / r["image"]) == f"Text in the image: {r['answer']}"


def test_precomputed_scienceqa_layouts(tmp_path):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"captions": {"17": "A map of the United States."}}))
    ocrs = tmp_path / "ocrs.json"
    ocrs.write_text(json.dumps({"texts": {"17": [[[[0, 0], [1, 1]], "Ohio", 0.9], [[[0, 2], [1, 3]], "Texas", 0.8]]}}))
    image = tmp_path / "images" / "17" / "image.png"
    assert PrecomputedExpert(captions).describe(image) == "Image caption: A map of the United States."
    assert PrecomputedExpert(ocrs).describe(image) == "Text in the image: Ohio Texas"
    assert PrecomputedExpert(ocrs).describe(tmp_path / "images" / "99" / "image.png") == ""
    literal = tmp_path / "ocrs_literal.json"  # the layout of ScienceQA's own ocrs.json
    literal.write_text(json.dumps({"texts": {"17": "[([[0, 0], [1, 1]], 'Ohio', 0.9)]", "18": ""}}))
    assert PrecomputedExpert(literal).describe(image) == "Text in the image: Ohio"
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_expert(f"precomputed:{tmp_path / 'nothere.json'}")
    with pytest.raises(ValueError, match="unknown expert 'detector'"):
        load_expert("detector")


def test_expert_text_goes_into_the_context_slot(tiny):
    _, tok = tiny
    expert = CallableExpert(lambda image: "a red circle")
    ids = expert_prompt_ids(tok, "What colour is the shape?", "img.png", [expert], "alpaca")
    text = tok.decode(ids)
    assert "### Input:\nImage caption: a red circle\n\n### Response:" in text
    assert with_context("Hint: look", ["", "OCR: x"]) == "Hint: look\nOCR: x"
    no_image = tok.decode(expert_prompt_ids(tok, "What colour is the shape?", None, [expert], "alpaca"))
    assert "### Input:" not in no_image


def test_generate_cli_with_precomputed_expert(tiny, tiny_folder, tmp_path, capsys):
    from llama_adapter.cli import main
    from llama_adapter.generate import Sampling, complete_ids

    model, tok = tiny
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps({"photo": "two dogs"}))
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "say hello", "--image", "x/photo.png",
                 "--expert", f"precomputed:{texts}", "--no-chat", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    ids = expert_prompt_ids(tok, "say hello", "x/photo.png", [PrecomputedExpert(texts)], "alpaca")
    assert capsys.readouterr().out == complete_ids(model, tok, [ids], Sampling(max_new_tokens=4))[0] + "\n"


@pytest.mark.slow
def test_ocr_expert_lets_smollm2_read_words_without_training(words):
    from llama_adapter.eval.ocr import ocr_word_accuracy

    records, root = words
    model, tok = la.load_pretrained("smollm2-135m")
    without = ocr_word_accuracy(model, tok, records, root, experts=[])
    with_ocr = ocr_word_accuracy(model, tok, records, root, experts=[load_expert("ocr")])
    assert with_ocr >= 0.66 and without <= 0.34
