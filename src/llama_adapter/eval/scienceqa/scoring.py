"""ScienceQA answers and scores: parsing a reply, the eight groups, accuracy, and the predictions file."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...fileio import atomic_write_text
from .loading import LETTERS, SUBJECT_GROUPS, Problem

GROUPS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


# ---------------------------------------------------------------------------------------------------------------
# answers and groups

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)
_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)|([A-Z])(?![A-Za-z0-9'])")


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!")


def _choice_match(text: str, choices: Sequence[str]) -> int | None:
    t = _norm(text)
    hits = [i for i, c in enumerate(choices) if _norm(c) == t]
    return hits[0] if len(hits) == 1 else None


def parse_answer(reply: str, choices: Sequence[str]) -> int | None:
    """The chosen index, or None when the reply cannot be parsed (then it is wrong, never guessed).

    Accepted: "The answer is B." (also "answer is (B)", "answer is: B", text after the letter), a bare "B",
    "(B)" or "B.", the exact text of one choice (case and surrounding whitespace/period ignored), also after
    "The answer is". The first "answer is" decides; a letter beyond the choices is unparsed."""
    text = reply.strip()
    m = _ANSWER_IS.search(text)
    if m:
        tail = re.split(r"\bBECAUSE\b|\n", text[m.end():], maxsplit=1)[0].strip()
        hit = _choice_match(tail, choices)
        if hit is not None:
            return hit
        lm = _LETTER.match(tail)
        if lm is None:
            return None
        letter = (lm.group(1) or lm.group(2)).upper()
    else:
        first = text.split("\n", 1)[0].strip()
        hit = _choice_match(first, choices)
        if hit is not None:
            return hit
        lm = re.fullmatch(r"\(\s*([A-Za-z])\s*\)\.?|([A-Z])[.)]?", first)
        if lm is None:
            return None
        letter = (lm.group(1) or lm.group(2)).upper()
    index = LETTERS.index(letter)
    return index if index < len(choices) else None


def groups_of(p: Problem) -> list[str]:
    """ScienceQA's groups of a problem, as its official scorer defines them: subject (NAT/SOC/LAN); TXT when the
    hint is non-empty, IMG when the problem has an image (both may hold), NO when neither; G1-6 or G7-12."""
    out = [SUBJECT_GROUPS[p.subject]]
    if p.hint:
        out.append("TXT")
    if p.has_image:
        out.append("IMG")
    if not p.hint and not p.has_image:
        out.append("NO")
    out.append("G1-6" if p.grade <= 6 else "G7-12")
    return out


@dataclass
class ScienceQAResult:
    """Accuracy overall and per group, the unparsed count, and one prediction row per problem."""

    accuracy: float
    groups: dict[str, float | None]  # accuracy per group (None: no problem of that group)
    n: int
    unparsed: int
    predictions: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)  # problems per group
    mode: str = "generate"
    circular: bool = False  # a problem is right only when every rotation of its choices is answered right
    answer_form: str = "letter"

    def summary(self) -> dict[str, Any]:
        """The figures without the per-problem rows (JSON-ready)."""
        return {"n": self.n, "accuracy": self.accuracy, "unparsed": self.unparsed, "mode": self.mode,
                "circular": self.circular, "answer_form": self.answer_form, "groups": self.groups,
                "counts": self.counts}


def score(problems: Sequence[Problem], predictions: Sequence[int | None], replies: Sequence[str],
          mode: str = "generate", extra: Sequence[dict[str, Any]] | None = None,
          correct: Sequence[bool] | None = None) -> ScienceQAResult:
    """Accuracy overall and per group; a None prediction is wrong and counted as unparsed. `correct` (circular
    evaluation) decides each problem instead of its prediction."""
    if not len(problems) == len(predictions) == len(replies):
        raise ValueError(f"{len(problems)} problems, {len(predictions)} predictions, {len(replies)} replies")
    right = dict.fromkeys(GROUPS, 0)
    total = dict.fromkeys(GROUPS, 0)
    rows: list[dict[str, Any]] = []
    for i, (p, pred, reply) in enumerate(zip(problems, predictions, replies)):
        ok = (pred is not None and pred == p.answer) if correct is None else bool(correct[i])
        gs = groups_of(p)
        for g in gs:
            total[g] += 1
            right[g] += ok
        row = {"pid": p.pid, "prediction": pred, "letter": None if pred is None else LETTERS[pred],
               "answer": p.answer, "reply": reply, "correct": ok, "groups": gs}
        if extra is not None:
            row.update(extra[i])
        rows.append(row)
    n = len(problems)
    return ScienceQAResult(sum(r["correct"] for r in rows) / n if n else 0.0,
                           {g: right[g] / total[g] if total[g] else None for g in GROUPS}, n,
                           sum(pred is None for pred in predictions), rows, total, mode, correct is not None)


def write_predictions(result: ScienceQAResult, path: str | Path) -> Path:
    """JSONL, one line per problem: pid, prediction (index or null), letter, answer, reply, correct, groups."""
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in result.predictions))


def format_result(result: ScienceQAResult) -> str:
    """A short table: overall, the eight groups (with counts) and the unparsed count."""
    def pct(v: float | None) -> str:
        return "  n/a" if v is None else f"{100 * v:5.2f}"

    how = ", ".join([result.mode] + ["circular"] * result.circular
                    + ["choice answers"] * (result.answer_form == "choice"))
    lines = [f"ScienceQA ({how}): {result.n} problems, accuracy {pct(result.accuracy)}%, "
             f"unparsed {result.unparsed}"]
    lines.append("  ".join(f"{g:>6}" for g in GROUPS))
    lines.append("  ".join(f"{pct(result.groups[g]):>6}" for g in GROUPS))
    lines.append("  ".join(f"{'n=' + str(result.counts.get(g, 0)):>6}" for g in GROUPS))
    return "\n".join(lines)
