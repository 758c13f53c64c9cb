"""ScienceQA: loading (both layouts), the development protocol, prompts, answer parsing, groups, ranked-choice
scoring against a direct computation, and the CLI end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_folder
from PIL import Image

import llama_adapter as la
from llama_adapter.cli import main
from llama_adapter.data.multimodal import encode_conversation, prompt_ids, read_llava
from llama_adapter.data.tokenize import IGNORE
from llama_adapter.eval.scienceqa import (
    ANSWER_INSTRUCTION,
    CHOICE_INSTRUCTION,
    GROUPS,
    Problem,
    choice_logprobs,
    dev_protocol_train,
    dev_protocol_val,
    evaluate_scienceqa,
    format_result,
    groups_of,
    load_scienceqa,
    parse_answer,
    question_text,
    rotate_choices,
    scienceqa_conversations,
    scienceqa_to_llava,
    score,
    shuffle_choices,
    target_text,
    write_predictions,
)
from llama_adapter.experts import PrecomputedExpert

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa"
SUBJECTS = ("natural science", "social science", "language science")


def problem(i: int, split: str, image: bool = False, hint: str = "", grade: int = 3, n_choices: int = 2,
            answer: int = 0, lecture: str | None = None, solution: str | None = None) -> dict:
    return {"question": f"what is {i}?", "choices": ["red", "blue", "green", "yes", "no"][:n_choices],
            "answer": answer, "hint": hint, "image": "image.png" if image else None, "task": "closed choice",
            "grade": f"grade{grade}", "subject": SUBJECTS[i % 3], "topic": "t", "category": "c", "skill": "s",
            "lecture": lecture, "solution": solution, "split": split}


# pid: (split, image, hint, grade); dev pids % 4 decide the protocol side
SPEC = {"1": ("train", True, "", 2), "3": ("val", False, "a hint", 8), "4": ("dev", True, "", 5),
        "6": ("dev", False, "the sky", 10), "8": ("dev", True, "look", 1), "10": ("dev", False, "", 12),
        "12": ("dev", False, "", 7), "14": ("dev", True, "", 6)}


def save_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


def shared_layout(root: Path, with_train_images: bool = False) -> tuple[Path, Path]:
    data = {pid: problem(int(pid), s, im, h, g, n_choices=2 + int(pid) % 3, answer=int(pid) % 2)
            for pid, (s, im, h, g) in SPEC.items()}
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(data))
    for pid, (s, im, _, _) in SPEC.items():
        if im and (s == "dev" or with_train_images):
            save_png(root / "images" / pid / "image.png", int(pid))
    return root / "problems.json", root / "images"


@pytest.fixture
def shared(tmp_path) -> tuple[Path, Path]:
    return shared_layout(tmp_path / "sqa")


# ---------------------------------------------------------------------------------------------------------------
# loading and protocol


def test_shared_layout_loader_and_missing_images(shared):
    problems_file, images = shared
    with pytest.raises(FileNotFoundError, match=r"problem 1 has an image.*images/1/image.png"):
        load_scienceqa(problems_file, images)
    ps = load_scienceqa(problems_file, images, missing_images="text")
    assert [p.pid for p in ps] == list(SPEC)
    by = {p.pid: p for p in ps}
    assert by["1"].has_image and by["1"].image is None  # train image not available: text only, still IMG
    assert by["4"].image == images / "4" / "image.png" and by["4"].grade == 5 and by["4"].split == "dev"
    assert by["6"].hint == "the sky" and by["6"].image is None and not by["6"].has_image
    assert by["10"].choices == ["red", "blue", "green"] and by["10"].answer == 0 and by["10"].meta["topic"] == "t"
    dev = load_scienceqa(problems_file, images, split="dev")
    assert [p.pid for p in dev] == ["4", "6", "8", "10", "12", "14"]
    assert [p.pid for p in load_scienceqa(problems_file, None, pids=[14, "4"])] == ["4", "14"]
    assert all(p.image is None for p in load_scienceqa(problems_file))  # no images folder: text only
    with pytest.raises(ValueError, match="no problem with pid 99"):
        load_scienceqa(problems_file, pids=["99"])


def test_official_layout_with_pid_splits(tmp_path):
    root = tmp_path / "official"
    data = {"1": problem(1, "train", image=True), "2": problem(2, "test", image=True, hint="h"),
            "5": problem(5, "test"), "7": problem(7, "val", grade=9)}
    for r in data.values():
        del r["split"]  # the split comes from pid_splits.json
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(data))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1"], "val": ["7"], "test": ["2", "5"],
                                                      "minival": ["7"], "trainval": ["1", "7"]}))
    save_png(root / "images" / "train" / "1" / "image.png", 1)
    save_png(root / "images" / "test" / "2" / "image.png", 2)
    ps = load_scienceqa(root / "problems.json", root / "images")
    assert [(p.pid, p.split) for p in ps] == [("1", "train"), ("2", "test"), ("5", "test"), ("7", "val")]
    assert ps[1].image == root / "images" / "test" / "2" / "image.png"
    assert [p.pid for p in load_scienceqa(root / "problems.json", root / "images", split="test")] == ["2", "5"]
    assert [p.pid for p in load_scienceqa(root / "problems.json", split="trainval")] == ["1", "7"]
    (root / "images" / "test" / "2" / "image.png").unlink()
    with pytest.raises(FileNotFoundError, match="problem 2 has an image.*test/2/image.png"):
        load_scienceqa(root / "problems.json", root / "images")


def test_loader_errors_name_the_problem(tmp_path):
    bad = problem(3, "dev", n_choices=2, answer=2)
    (tmp_path / "p.json").write_text(json.dumps({"3": bad}))
    with pytest.raises(ValueError, match="problem 3: 'answer' must be an index"):
        load_scienceqa(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"3": {**problem(3, "dev"), "grade": "grade13"}}))
    with pytest.raises(ValueError, match="problem 3: grade"):
        load_scienceqa(tmp_path / "p.json")
    with pytest.raises(FileNotFoundError, match="problems file not found"):
        load_scienceqa(tmp_path / "nope.json")


def test_dev_protocol_split(shared):
    ps = load_scienceqa(shared[0], shared[1], missing_images="text")
    assert [p.pid for p in dev_protocol_train(ps)] == ["1", "3", "4", "8", "12"]
    assert [p.pid for p in dev_protocol_val(ps)] == ["6", "10", "14"]


@pytest.mark.skipif(not (SHARED / "problems.json").is_file(),
                    reason=f"the shared ScienceQA copy is not at {SHARED} (only this check needs it)")
def test_real_shared_counts():
    dev = load_scienceqa(SHARED / "problems.json", SHARED / "images", split="dev")
    assert len(dev) == 2149 and sum(p.image is not None for p in dev) == 1005
    everything = load_scienceqa(SHARED / "problems.json", SHARED / "images", missing_images="text")
    assert len(dev_protocol_train(everything)) == 1412 + 1104 and len(dev_protocol_val(everything)) == 1045
    assert not {p.pid for p in dev_protocol_train(everything)} & {p.pid for p in dev_protocol_val(everything)}


def test_shuffle_choices_keeps_each_answer_and_balances_positions():
    ps = [Problem(str(pid), "q", ["yes", "no"], int(pid % 4 == 0), "", False, None, "natural science", 3, "train")
          for pid in range(400)]  # answer (B) for a quarter of the problems, (A) otherwise
    once, again = shuffle_choices(ps), shuffle_choices(ps)
    assert [(p.choices, p.answer) for p in once] == [(p.choices, p.answer) for p in again]  # fixed by seed and pid
    assert all(s.choices[s.answer] == p.choices[p.answer] and sorted(s.choices) == sorted(p.choices)
               for s, p in zip(once, ps))
    assert 0.4 < sum(p.answer == 1 for p in once) / len(once) < 0.6  # from 25% to about half
    assert [p.choices for p in shuffle_choices(ps, seed=1)] != [p.choices for p in once]
    assert ps[0].choices == ["yes", "no"]  # the input is not changed


def test_rotate_choices_moves_the_answer_with_its_choice():
    p = Problem("7", "q", ["a", "b", "c"], 2, "", False, None, "natural science", 3, "dev")
    rotated = [rotate_choices(p, k) for k in range(4)]
    assert [r.choices for r in rotated] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert [r.choices[r.answer] for r in rotated] == ["c"] * 4 and [r.answer for r in rotated] == [2, 1, 0, 2]


# ---------------------------------------------------------------------------------------------------------------
# prompts, conversations, parsing, groups


def make(pid="5", hint="", has_image=False, image=None, grade=4, subject="natural science", lecture=None,
         solution=None, choices=("red", "blue", "green")) -> Problem:
    return Problem(pid, "Which colour?", list(choices), 1, hint, has_image, image, subject, grade, "dev",
                   lecture, solution)


def test_prompt_and_targets(tmp_path):
    p = make(hint="The sky.")
    assert question_text(p, instruction=None) == ("Question: Which colour?\nContext: The sky.\n"
                                                  "Options: (A) red (B) blue (C) green")
    assert question_text(make(), instruction="Say it.").endswith("Context: N/A\nOptions: (A) red (B) blue "
                                                                 "(C) green\nSay it.")
    assert target_text(p) == "The answer is B."
    assert target_text(p, "explain") == "The answer is B."  # no lecture, no solution: answer only
    assert target_text(make(lecture="Colours.", solution="It is blue."), "explain") == \
        "The answer is B. BECAUSE: Colours. It is blue."
    assert target_text(make(solution="It is blue."), "explain") == "The answer is B. BECAUSE: It is blue."
    with pytest.raises(ValueError, match="unknown target format"):
        target_text(p, "cot")
    # the choice form names the choice's text, and its default instruction asks for that
    assert target_text(p, answer_form="choice") == "The answer is blue."
    assert target_text(make(solution="It is blue."), "explain", "choice") == "The answer is blue. BECAUSE: It is blue."
    assert question_text(p, answer_form="choice").endswith("(C) green\n" + CHOICE_INSTRUCTION)
    assert question_text(p).endswith("(C) green\n" + ANSWER_INSTRUCTION)
    assert question_text(p, instruction=None, answer_form="choice").endswith("(C) green")
    with pytest.raises(ValueError, match="unknown answer form 'word'"):
        target_text(p, answer_form="word")
    # experts go into the context; a problem whose image file is missing gets precomputed texts by pid
    (tmp_path / "caps.json").write_text(json.dumps({"captions": {"5": "a blue sky"}}))
    caps = PrecomputedExpert(tmp_path / "caps.json")
    assert "Context: The sky.\nImage caption: a blue sky\n" in question_text(make(hint="The sky.", has_image=True),
                                                                             [caps])
    assert "Context: N/A\n" in question_text(make(), [caps])  # no image: no expert text


def test_conversations_and_llava_file_round_trip(shared, hf_tokenizer, tmp_path):
    from llama_adapter.model.tokenizer import Tokenizer

    tok = Tokenizer(hf_tokenizer)
    ps = dev_protocol_train(load_scienceqa(shared[0], shared[1], missing_images="text"))
    convs = scienceqa_conversations(ps, instruction=None)
    assert [c.image is not None for c in convs] == [False, False, True, True, False]
    assert convs[0].turns[0][1] == "The answer is B." and convs[0].meta["id"] == "1"
    ex = encode_conversation(tok, convs[2], 512, "chat")
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert tok.decode(trained, skip_special_tokens=False) == "The answer is A.<|im_end|>"
    n = scienceqa_to_llava(ps, tmp_path / "train.json", instruction=None, image_root=shared[1])
    back = read_llava(tmp_path / "train.json", image_root=shared[1])
    assert n == len(back) == 5
    assert [(b.image, b.turns) for b in back] == [(c.image, c.turns) for c in convs]
    # the choice form: the same problems, answered by the choice's text
    words = scienceqa_conversations(ps, answer_form="choice")
    assert [w.turns[0][1] for w in words] == [f"The answer is {p.choices[p.answer]}." for p in ps]
    assert all(w.turns[0][0].endswith(CHOICE_INSTRUCTION) for w in words)


def test_cli_writes_the_protocol_training_file_with_shuffled_choices(shared, tmp_path, capsys):
    out = tmp_path / "train.json"
    args = ["data", "scienceqa", "--problems", str(shared[0]), "--images", str(shared[1]), "--protocol", "dev-train"]
    assert main([*args, "--out", str(out)]) == 0
    assert "wrote 5 problems" in capsys.readouterr().out
    problems = shuffle_choices(dev_protocol_train(load_scienceqa(shared[0], shared[1], missing_images="text")))
    back = read_llava(out, image_root=shared[1])
    assert [b.turns for b in back] == [c.turns for c in scienceqa_conversations(problems)]
    assert main([*args, "--out", str(out), "--option-order", "original"]) == 0
    original = scienceqa_conversations(dev_protocol_train(load_scienceqa(shared[0], shared[1],
                                                                         missing_images="text")))
    assert [b.turns for b in read_llava(out, image_root=shared[1])] == [c.turns for c in original] != \
        [c.turns for c in scienceqa_conversations(problems)]
    assert main([*args, "--out", str(out), "--answer-form", "choice"]) == 0
    assert [b.turns for b in read_llava(out, image_root=shared[1])] == \
        [c.turns for c in scienceqa_conversations(problems, answer_form="choice")]


@pytest.mark.parametrize("reply,index", [
    ("The answer is B.", 1), ("the answer is (C)", 2), ("Answer is: A", 0), ("The answer is B. BECAUSE: x", 1),
    ("B", 1), ("(c)", 2), ("C.", 2), ("  blue. ", 1), ("The answer is green.", 2), ("The answer is (b).", 1),
    ("The answer is B because the sky is blue", 1),
])
def test_parser_accepts(reply, index):
    assert parse_answer(reply, ["red", "blue", "green"]) == index


@pytest.mark.parametrize("reply", ["", "I think so", "The answer is D.", "The answer is maybe.", "E",
                                   "Both A and B", "a", "The answer is", "Answer: purple"])
def test_parser_refuses_and_unparsed_is_wrong(reply):
    assert parse_answer(reply, ["red", "blue", "green"]) is None
    r = score([make()], [None], [reply])
    assert r.accuracy == 0 and r.unparsed == 1 and r.predictions[0]["correct"] is False
    assert r.predictions[0]["prediction"] is None and r.predictions[0]["letter"] is None


def test_groups_as_the_official_scorer():
    assert groups_of(make(hint="h")) == ["NAT", "TXT", "G1-6"]
    assert groups_of(make(has_image=True, subject="social science", grade=7)) == ["SOC", "IMG", "G7-12"]
    assert groups_of(make(hint="h", has_image=True, subject="language science", grade=6)) == \
        ["LAN", "TXT", "IMG", "G1-6"]
    assert groups_of(make(grade=12)) == ["NAT", "NO", "G7-12"]
    ps = [make("1", hint="h"), make("2", has_image=True), make("3"), make("4", grade=9)]
    r = score(ps, [1, 0, None, 1], ["", "", "", ""])
    assert r.accuracy == 0.5 and r.unparsed == 1 and r.n == 4
    assert r.groups["TXT"] == 1.0 and r.groups["IMG"] == 0.0 and r.groups["NO"] == 0.5
    assert r.groups["G1-6"] == pytest.approx(1 / 3) and r.groups["G7-12"] == 1.0 and r.groups["SOC"] is None
    assert r.counts == {"NAT": 4, "SOC": 0, "LAN": 0, "TXT": 1, "IMG": 1, "NO": 2, "G1-6": 3, "G7-12": 1}


# ---------------------------------------------------------------------------------------------------------------
# scoring with a model


def direct_logprob(model, tok, question: str, answer: str) -> float:
    prompt = prompt_ids(tok, question, "chat", has_image=False)
    ans = tok.encode(answer, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ans])).float().log_softmax(-1)[0]
    return sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(ans))


def test_ranked_scores_equal_direct_log_probs(tiny, shared, tmp_path):
    """Both layouts (a prompt shared by its choices, and one sequence per choice) against a plain forward."""
    model, tok = tiny
    torch.set_num_threads(1)
    ps = load_scienceqa(shared[0], None, split="dev")[:4]
    for shared_prompt in (True, False):
        got = choice_logprobs(model, tok, ps, "chat", batch_size=3, instruction=None, shared_prompt=shared_prompt)
        for p, scores in zip(ps, got):
            q = question_text(p, instruction=None)
            want = [direct_logprob(model, tok, q, f"The answer is {'ABCDE'[k]}.") for k in range(len(p.choices))]
            np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
        by_text = choice_logprobs(model, tok, ps, "chat", batch_size=3, instruction=None, shared_prompt=shared_prompt,
                                  answers=lambda p: [f"The answer is {c}." for c in p.choices])
        for p, scores in zip(ps, by_text):
            q = question_text(p, instruction=None)
            want = [direct_logprob(model, tok, q, f"The answer is {c}.") for c in p.choices]
            np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
    r = evaluate_scienceqa(model, tok, ps, mode="ranked", instruction=None, batch_size=2)
    assert [x["prediction"] for x in r.predictions] == [int(np.argmax(s)) for s in got] and r.unparsed == 0
    write_predictions(r, tmp_path / "pred.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [x["pid"] for x in rows] == [p.pid for p in ps] and set(rows[0]) >= {"pid", "prediction", "letter",
                                                                                 "reply", "correct", "groups"}
    # the choice form ranks "The answer is <choice>." under its own instruction
    r = evaluate_scienceqa(model, tok, ps, mode="ranked", batch_size=2, answer_form="choice")
    for p, row in zip(ps, r.predictions):
        q = question_text(p, answer_form="choice")
        want = [direct_logprob(model, tok, q, f"The answer is {c}.") for c in p.choices]
        np.testing.assert_allclose(row["logprobs"], want, rtol=1e-4, atol=1e-4)
        assert row["prediction"] == int(np.argmax(want))
        assert row["reply"] == f"The answer is {p.choices[row['prediction']]}."
    assert r.summary()["answer_form"] == "choice"


def test_circular_evaluation_needs_every_rotation_right(tiny, shared):
    """Circular picks are the plain ranked picks of each rotation, mapped back to the given choices; a problem
    is right only when all of them are its answer; the first rotation is the plain evaluation."""
    model, tok = tiny
    ps = load_scienceqa(shared[0], None, split="dev")
    plain = evaluate_scienceqa(model, tok, ps, mode="ranked", instruction=None)
    circ = evaluate_scienceqa(model, tok, ps, mode="ranked", instruction=None, circular=True)
    assert circ.circular and not plain.circular and "ranked, circular" in format_result(circ)
    for p, row, plain_row in zip(ps, circ.predictions, plain.predictions):
        n = len(p.choices)
        rotated = [rotate_choices(p, k) for k in range(n)]
        scores = choice_logprobs(model, tok, rotated, "chat", instruction=None)
        want = [(int(np.argmax(sc)) + k) % n for k, sc in enumerate(scores)]
        assert row["circular_picks"] == want and row["correct"] == all(w == p.answer for w in want)
        assert row["prediction"] == plain_row["prediction"]
    assert circ.accuracy == sum(r["correct"] for r in circ.predictions) / len(ps) <= plain.accuracy
    picks = {tuple(r["circular_picks"]) for r in circ.predictions}
    assert any(len(set(pk)) > 1 for pk in picks)  # the tiny model's picks do depend on the order


def test_generate_mode_never_guesses(tiny, shared):
    model, tok = tiny
    ps = load_scienceqa(shared[0], None, split="dev")
    r = evaluate_scienceqa(model, tok, ps, mode="generate", instruction=None, max_new_tokens=4, batch_size=4)
    for row, p in zip(r.predictions, ps):
        assert row["prediction"] == parse_answer(row["reply"], p.choices)
        assert row["correct"] == (row["prediction"] == p.answer)
    assert r.unparsed == sum(row["prediction"] is None for row in r.predictions)
    assert r.accuracy == sum(row["correct"] for row in r.predictions) / len(ps)


MULTIMODAL = {"v1": lambda clip: la.AdapterV1Config(prompt_len=3, vision=clip, feature_cache=False),
              "v2": lambda clip: la.AdapterV2Config(prompt_len=3, n_layers=2, vision=clip, visual_layers=2,
                                                    visual_queries=3, visual_width=32, feature_cache=False),
              "lavin": lambda clip: la.LavinConfig(vision=clip, feature_cache=False)}


@pytest.mark.parametrize("method", sorted(MULTIMODAL))
def test_ranked_scores_with_images_equal_the_training_layout(method, tiny_folder, shared):
    """Each method with a tiny CLIP: the shared-prompt scores of a batch mixing image and text problems of
    different lengths equal each prompt + answer scored alone in the training layout (the trainer's
    `prepare_batch`), and images change them."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    clip = tiny_folder.parent / "clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(str(clip))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip))
    model, tok = la.load_pretrained(tiny_folder)
    la.attach(model, MULTIMODAL[method](f"clip:{clip}"), tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in la.trainable_parameters(model).values():
            prm.add_(torch.randn(prm.shape, generator=g) * 0.3)
    model.eval()
    ps = load_scienceqa(shared[0], shared[1], split="dev")
    assert 0 < sum(p.image is not None for p in ps) < len(ps)
    got = choice_logprobs(model, tok, ps, "chat", instruction=None, batch_size=len(ps))
    blind = choice_logprobs(model, tok, ps, "chat", instruction=None, images=False, batch_size=4)
    alone = choice_logprobs(model, tok, ps, "chat", instruction=None, batch_size=1, shared_prompt=False)
    for p, scores, want, scores_blind in zip(ps, got, alone, blind):
        np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
        assert np.allclose(scores, scores_blind) == (p.image is None), p.pid


def test_cli_end_to_end(tmp_path, shared, capsys):
    folder = save_tiny_folder(tmp_path / "tiny", max_position_embeddings=1024)
    out = tmp_path / "pred.jsonl"
    args = ["eval", "scienceqa", "--model", str(folder), "--problems", str(shared[0]), "--images", str(shared[1]),
            "--device", "cpu", "--batch-size", "2"]
    assert main([*args, "--protocol", "dev-val", "--mode", "ranked", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 problems" in text and "unparsed 0" in text and all(g in text for g in GROUPS)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["pid"] for r in rows] == ["6", "10", "14"]
    model, tok = la.load_pretrained(folder)
    ps = dev_protocol_val(load_scienceqa(shared[0], shared[1], missing_images="text"))
    want = evaluate_scienceqa(model, tok, ps, mode="ranked")
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in want.predictions]
    assert main([*args, "--protocol", "dev-val", "--mode", "ranked", "--circular", "--out", str(out)]) == 0
    assert "ScienceQA (ranked, circular): 3 problems" in capsys.readouterr().out
    circ = evaluate_scienceqa(model, tok, ps, mode="ranked", circular=True)
    assert [json.loads(line)["circular_picks"] for line in out.read_text().splitlines()] == [
        r["circular_picks"] for r in circ.predictions]
    assert main([*args, "--protocol", "dev-val", "--mode", "ranked", "--answer-form", "choice", "--out", str(out)]) == 0
    assert "ScienceQA (ranked, choice answers): 3 problems" in capsys.readouterr().out
    words = evaluate_scienceqa(model, tok, ps, mode="ranked", answer_form="choice")
    got = [json.loads(line)["logprobs"] for line in out.read_text().splitlines()]
    for g, w, letter in zip(got, words.predictions, want.predictions):
        np.testing.assert_allclose(g, w["logprobs"], rtol=1e-5)
        assert not np.allclose(g, letter["logprobs"])
    assert main([*args, "--split", "dev", "--limit", "2", "--max-new-tokens", "3"]) == 0
    assert "ScienceQA (generate): 2 problems" in capsys.readouterr().out
    assert main([*args[:-4], "--device", "cpu"]) == 2  # train problem 1's image is missing
    assert "problem 1 has an image" in capsys.readouterr().err
