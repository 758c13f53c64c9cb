"""Caption metrics written from their papers: corpus BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al.
2015, as computed by the COCO caption evaluation).

Both take `candidates` (one caption per image) and `references` (a list of reference captions per image), in
the same order, or dicts keyed by image id. Text is lower-cased and split into words: runs of letters and
digits (an apostrophe inside a word keeps it whole); punctuation is dropped, as the COCO evaluation's
tokenizer drops it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

_WORD = re.compile(r"[0-9a-z]+(?:'[0-9a-z]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers (apostrophes kept inside words), punctuation dropped."""
    return _WORD.findall(text.lower())


def ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of the n-grams of `words`."""
    return Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))


def _pairs(candidates: Sequence[str] | Mapping[str, str],
           references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]]) -> list[tuple[str, list[str]]]:
    if isinstance(candidates, Mapping):
        if not isinstance(references, Mapping):
            raise ValueError("candidates are keyed by image id, so references must be too")
        missing = [k for k in candidates if k not in references]
        if missing:
            raise ValueError(f"no references for image(s) {', '.join(map(str, missing[:5]))}")
        pairs = [(candidates[k], list(references[k])) for k in candidates]
    else:
        if isinstance(references, Mapping) or len(candidates) != len(references):
            raise ValueError("give one list of references per candidate, in the same order")
        pairs = [(c, list(r)) for c, r in zip(candidates, references)]
    if not pairs:
        raise ValueError("no captions to score")
    for i, (c, refs) in enumerate(pairs):
        if not isinstance(c, str):
            raise ValueError(f"candidate {i} is not a string")
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"image {i}: references must be a non-empty list of strings")
    return pairs


def bleu(candidates: Sequence[str] | Mapping[str, str],
         references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n: the geometric mean of the corpus-wide clipped n-gram precisions (orders 1..n), times the
    brevity penalty exp(1 - r/c) when the total candidate length c is below the effective reference length r
    (per image, the reference length closest to the candidate's; the shorter one on a tie). No smoothing: a zero
    precision makes the score 0."""
    matched, possible = [0] * n, [0] * n
    c_len = r_len = 0
    for cand, refs in _pairs(candidates, references):
        words = tokenize(cand)
        ref_words = [tokenize(r) for r in refs]
        c_len += len(words)
        r_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for k in range(1, n + 1):
            counts = ngrams(words, k)
            best: Counter[tuple[str, ...]] = Counter()
            for r in ref_words:
                best |= ngrams(r, k)  # the most times each n-gram occurs in one reference
            matched[k - 1] += sum(min(c, best[g]) for g, c in counts.items())
            possible[k - 1] += sum(counts.values())
    if c_len == 0 or any(m == 0 for m in matched):
        return 0.0
    log_p = sum(math.log(m / p) for m, p in zip(matched, possible)) / n
    bp = 1.0 if c_len >= r_len else math.exp(1 - r_len / c_len)
    return bp * math.exp(log_p)


def bleu4(candidates: Sequence[str] | Mapping[str, str],
          references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]]) -> float:
    """Corpus BLEU-4 (`bleu` with n = 4)."""
    return bleu(candidates, references, 4)


def _tfidf(words: Sequence[str], df: Counter[tuple[str, ...]], log_n: float,
           n: int) -> tuple[list[dict[tuple[str, ...], float]], list[float]]:
    """Per order: the n-gram -> tf * idf vector and its L2 norm (tf: raw counts, as the COCO code uses)."""
    vecs, norms = [], []
    for k in range(1, n + 1):
        vec = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in ngrams(words, k).items()}
        vecs.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vecs, norms


def cider_d_scores(candidates: Sequence[str] | Mapping[str, str],
                   references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]], n: int = 4,
                   sigma: float = 6.0) -> list[float]:
    """CIDEr-D per image. Document frequencies come from the references of the evaluated set (an n-gram's df is
    the number of images whose references contain it; idf = log(#images) - log(max(1, df))). Per order k, the
    similarity to a reference is sum(min(c_g, r_g) * r_g) / (|c| |r|) over the candidate's n-grams (tf-idf
    vectors, the candidate's clipped by the reference's), times the gaussian length penalty
    exp(-(len_c - len_r)^2 / (2 sigma^2)); the score averages the orders and the references, times 10."""
    pairs = _pairs(candidates, references)
    tokenized = [(tokenize(c), [tokenize(r) for r in refs]) for c, refs in pairs]
    df: Counter[tuple[str, ...]] = Counter()
    for _, refs in tokenized:
        df.update({g for r in refs for k in range(1, n + 1) for g in ngrams(r, k)})
    log_n = math.log(len(tokenized))
    out = []
    for words, refs in tokenized:
        cv, cn = _tfidf(words, df, log_n, n)
        total = 0.0
        for r in refs:
            rv, rn = _tfidf(r, df, log_n, n)
            penalty = math.exp(-((len(words) - len(r)) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                if cn[k] and rn[k]:
                    dot = sum(min(v, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, v in cv[k].items())
                    total += penalty * dot / (cn[k] * rn[k])
        out.append(10.0 * total / (n * len(refs)))
    return out


def cider_d(candidates: Sequence[str] | Mapping[str, str],
            references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of the per-image scores (see `cider_d_scores`)."""
    scores = cider_d_scores(candidates, references, n, sigma)
    return sum(scores) / len(scores)
