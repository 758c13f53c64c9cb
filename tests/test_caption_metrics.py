"""BLEU-4 and CIDEr-D on cases computed by hand."""

from __future__ import annotations

import math

import pytest

from llama_adapter.eval.captions import bleu, bleu4, cider_d, cider_d_scores, tokenize


def test_tokenizer_lowercases_and_drops_punctuation():
    assert tokenize("A Dog, running on the beach!  It's fun.") == ["a", "dog", "running", "on", "the", "beach",
                                                                    "it's", "fun"]


def test_bleu_identical_and_disjoint():
    refs = [["a man rides a horse on the beach", "someone on a horse"]]
    assert bleu4(["A man rides a horse on the beach."], refs) == pytest.approx(1.0)
    assert bleu4(["green purple elephants sing"], refs) == 0.0
    assert bleu4([""], refs) == 0.0


def test_bleu_worked_example():
    # candidate "the cat sat on the mat", reference "the cat sat on a mat":
    # p1 = 5/6 ("the" clipped to 1), p2 = 3/5 (the cat, cat sat, sat on), p3 = 2/4 (the cat sat, cat sat on),
    # p4 = 1/3 (the cat sat on); equal lengths, so no brevity penalty: BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4)
    got = bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert got == pytest.approx((1 / 12) ** 0.25)
    assert got == pytest.approx(0.537284965911771)
    # the brevity penalty: a 4-word prefix of a 6-word reference, all precisions 1 -> exp(1 - 6/4)
    assert bleu4(["the cat sat on"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(-0.5))
    # the closest reference length counts (4 words here, so no penalty); longer candidates are not penalised
    assert bleu4(["the cat sat on"], [["the cat sat on the mat", "the cat sat on"]]) == pytest.approx(1.0)
    # corpus level: counts are summed over images before the precisions are taken
    cands, refs = ["the cat sat on the mat", "a dog runs"], [["the cat sat on a mat"], ["a dog runs"]]
    p = [(5 + 3) / (6 + 3), (3 + 2) / (5 + 2), (2 + 1) / (4 + 1), (1 + 0) / (3 + 0)]
    assert bleu4(cands, refs) == pytest.approx(math.prod(p) ** 0.25)
    assert bleu(cands, refs, n=1) == pytest.approx(8 / 9)
    assert bleu4({"x": "a dog runs on grass"}, {"x": ["a dog runs on grass"], "y": ["unused"]}) == pytest.approx(1.0)


def test_bleu_input_errors():
    with pytest.raises(ValueError, match="one list of references per candidate"):
        bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        bleu4(["a"], [[]])
    with pytest.raises(ValueError, match="no references for image"):
        bleu4({"x": "a"}, {"y": ["a"]})


REFS = [["a man rides a brown horse on the beach", "a person riding a horse near the sea"],
        ["two dogs play with a red ball in the grass", "dogs chasing a ball on a lawn"],
        ["a plate of pasta with tomato sauce", "spaghetti with red sauce on a white plate"]]


def test_cider_orders_and_zero():
    exact = ["a man rides a brown horse on the beach", "two dogs play with a red ball in the grass",
             "a plate of pasta with tomato sauce"]
    partial = ["a man on a horse", "two dogs in the grass", "a plate of food"]
    disjoint = ["green purple elephants sing", "quantum tax reform", "seven blue umbrellas"]
    e, p, d = (cider_d_scores(c, REFS) for c in (exact, partial, disjoint))
    assert all(x > y > 0 for x, y in zip(e, p))
    assert d == [0.0, 0.0, 0.0]
    assert cider_d(exact, REFS) > cider_d(partial, REFS) > cider_d(disjoint, REFS) == 0.0
    # the length penalty: padding an exact caption with unseen words lowers its score
    longer = [exact[0] + " under a very bright and warm summer sun today", *exact[1:]]
    assert cider_d_scores(longer, REFS)[0] < e[0]


def test_cider_worked_example():
    # two images, one reference each, unigrams only (n=1) to keep it by hand. Image 1 refs "a b", image 2 refs
    # "a c": df(a) = 2 -> idf 0; df(b) = df(c) = 1 -> idf log 2. Candidate 1 "a b": vector (0, log2) equals the
    # reference's, cosine 1, same length -> 10 * 1. Candidate 2 "a b": its "b" is not in reference 2 -> 0.
    scores = cider_d_scores(["a b", "a b"], [["a b"], ["a c"]], n=1)
    assert scores == pytest.approx([10.0, 0.0])
    # a repeated word is clipped to the reference's tf-idf: "b b" vs "b": min(2L, L) * L / (2L * L) = 1/2,
    # times the length penalty exp(-1 / 72)
    scores = cider_d_scores(["b b", "c"], [["b"], ["c"]], n=1)
    assert scores[0] == pytest.approx(10 * 0.5 * math.exp(-1 / 72))
    assert scores[1] == pytest.approx(10.0)
