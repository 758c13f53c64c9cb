"""ScienceQA problems: the `Problem` record, loading problems.json, and the development protocol's splits."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ...data.validate import (
    BadRecords,
    DataError,
    ImageChecker,
    MissingDataFile,
    check_all_text,
    read_json_document,
    text_field,
)
from ...fileio import read_json

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SUBJECT_GROUPS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
MISSING_IMAGES = ("error", "text")


@dataclass
class Problem:
    """One ScienceQA problem, validated: question, choices, the answer's index, context, image, subject, grade."""

    pid: str
    question: str
    choices: list[str]
    answer: int  # index into choices
    hint: str  # the text context, "" when none
    has_image: bool  # the problem has an image in the data (ScienceQA's IMG group), available or not
    image: Path | None  # the image file, None when the problem has none or it is not available
    subject: str
    grade: int
    split: str | None
    lecture: str | None = None
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # other fields: task, topic, category, skill, ...

    @property
    def answer_letter(self) -> str:
        """The right choice's letter ("A" for answer 0)."""
        return LETTERS[self.answer]


# ---------------------------------------------------------------------------------------------------------------
# loading


def _grade(value: Any, pid: str) -> int:
    text = str(value)
    m = re.fullmatch(r"(?:grade)?\s*(\d+)", text.strip(), re.IGNORECASE)
    if not m or not 1 <= int(m.group(1)) <= 12:
        raise ValueError(f"problem {pid}: grade must be 'grade1'..'grade12', got {value!r}")
    return int(m.group(1))


def _problem(pid: str, r: Any, split: str | None, images: Path | None, missing_images: str) -> Problem:
    where = f"problem {pid}"
    if not isinstance(r, dict):
        raise ValueError(f"{where} is not an object")
    question, choices, answer = r.get("question"), r.get("choices"), r.get("answer")
    if not isinstance(question, str):
        raise ValueError(f"{where}: 'question' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of at least two strings")
    if len(choices) > len(LETTERS):
        raise ValueError(f"{where}: {len(choices)} choices, at most {len(LETTERS)} are supported")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be an index into its {len(choices)} choices, got {answer!r}")
    hint = r.get("hint") or ""
    if not isinstance(hint, str):
        raise ValueError(f"{where}: 'hint' must be a string or null")
    subject = r.get("subject")
    if subject not in SUBJECT_GROUPS:
        raise ValueError(f"{where}: 'subject' must be one of {', '.join(SUBJECT_GROUPS)}, got {subject!r}")
    has_image = bool(r.get("image"))
    image = None
    if has_image and images is not None:
        name = str(r["image"])
        candidates = [images / pid / name] + ([images / split / pid / name] if split else [])
        image = next((c for c in candidates if c.is_file()), None)
        if image is None and missing_images == "error":
            raise FileNotFoundError(f"{where} has an image, but it is not at {candidates[0]}"
                                    + (f" nor {candidates[1]}" if len(candidates) > 1 else "")
                                    + " (missing_images='text' keeps such problems as text only)")
    meta = {k: v for k, v in r.items() if k not in ("question", "choices", "answer", "hint", "image", "subject",
                                                     "grade", "split", "lecture", "solution")}
    return Problem(pid, question, list(choices), answer, hint, has_image, image, subject, _grade(r.get("grade"), pid),
                   split, r.get("lecture") or None, r.get("solution") or None, meta)


def _validated_problem(path: Path, i: int, pid: str, r: Any, split: str | None, images: Path | None,
                       missing_images: str) -> Problem:
    """`_problem`, with every failure a DataError naming the record index, the pid and the field: text fields
    checked (type, emptiness, length, UTF-8), the image name kept inside the images folder and decodable."""
    try:
        if isinstance(r, dict):
            check_all_text(r, path, i)
            text_field(r, "question", path, i)
            for key in ("hint", "lecture", "solution", "split"):
                text_field(r, key, path, i, required=False, allow_empty=True)
            choices = r.get("choices")
            for j, choice in enumerate(choices if isinstance(choices, list) else []):
                if isinstance(choice, str):
                    text_field({"c": choice}, "c", path, i, label=f"choices[{j}]")
            if r.get("image") and images is not None:
                ImageChecker(images / pid, check_files=False)(r["image"], path, i)
        problem = _problem(pid, r, split, images, missing_images)
        if problem.image is not None:
            ImageChecker(problem.image.parent)(problem.image.name, path, i)
        return problem
    except DataError:
        raise
    except FileNotFoundError as e:
        raise MissingDataFile(f"record {i} of {path}, {e}", path, i) from e
    except ValueError as e:
        raise DataError(f"record {i} of {path}, {e}", path, i) from e


def load_scienceqa(problems: str | Path, images: str | Path | None = None, split: str | None = None,
                   pids: Iterable[str | int] | None = None, missing_images: str = "error",
                   pid_splits: str | Path | None = None, on_bad_record: str = "error") -> list[Problem]:
    """Problems from problems.json, in the file's order.

    Each problem is validated: a malformed one is a DataError naming the record index, the pid and the field
    (on_bad_record="skip": logged and left out).

    `images`: the images folder (images/<pid>/image.png or images/<split>/<pid>/image.png); None: no image files
    are looked at (every `image` is None; `has_image` still says which problems have one). A problem whose image
    is missing is an error naming the pid and path, or with missing_images="text" a text-only problem.
    `split`: keep the problems of this split: pid_splits.json's list when that file is present (given, or next
    to problems.json) and names the split, else the problems' own "split" field. `pids`: keep only these."""
    if missing_images not in MISSING_IMAGES:
        raise ValueError(f"missing_images must be one of {', '.join(MISSING_IMAGES)}, got {missing_images!r}")
    path = Path(problems)
    bad = BadRecords(path, on_bad_record)
    data = read_json_document(path, "ScienceQA problems file")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object pid -> problem", path)
    image_dir = Path(images) if images is not None else None
    if image_dir is not None and not image_dir.is_dir():
        raise FileNotFoundError(f"ScienceQA images folder not found: {image_dir}")
    splits_path = Path(pid_splits) if pid_splits is not None else path.parent / "pid_splits.json"
    split_of: dict[str, str] = {}
    chosen: set[str] | None = None
    if splits_path.is_file():
        table = read_json(splits_path, "pid_splits.json")
        for name in ("train", "val", "test"):  # the base splits (the file also lists trainval, minival, ...)
            split_of.update({str(p): name for p in table.get(name, [])})
        if split is not None and split in table:
            chosen = {str(p) for p in table[split]}
    elif pid_splits is not None:
        raise FileNotFoundError(f"pid_splits file not found: {splits_path}")
    wanted = None if pids is None else {str(p) for p in pids}
    out = []
    for i, (pid, r) in enumerate(data.items()):
        pid = str(pid)
        if wanted is not None and pid not in wanted:
            continue
        own = r.get("split") if isinstance(r, dict) else None
        psplit = own or split_of.get(pid)
        if split is not None and (pid not in chosen if chosen is not None else psplit != split):
            continue
        try:
            out.append(_validated_problem(path, i, pid, r, psplit, image_dir, missing_images))
        except DataError as e:
            bad.handle(e)
    bad.report()
    if wanted is not None and len(out) < len(wanted):
        missing = sorted(wanted - {p.pid for p in out})
        if missing and split is None:
            raise ValueError(f"{path}: no problem with pid {', '.join(missing[:5])}"
                             + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the development protocol


def _pid_mod4(p: Problem) -> int:
    try:
        return int(p.pid) % 4
    except ValueError as e:
        raise ValueError(f"the development protocol needs integer pids, got {p.pid!r}") from e


def dev_protocol_train(problems: Iterable[Problem]) -> list[Problem]:
    """Training problems: every train/val problem, plus the dev problems with int(pid) % 4 == 0."""
    return [p for p in problems if p.split in ("train", "val") or (p.split == "dev" and _pid_mod4(p) == 0)]


def dev_protocol_val(problems: Iterable[Problem]) -> list[Problem]:
    """Validation problems: the dev problems with int(pid) % 4 == 2."""
    return [p for p in problems if p.split == "dev" and _pid_mod4(p) == 2]


PROTOCOLS = {"dev-train": dev_protocol_train, "dev-val": dev_protocol_val}


def shuffle_choices(problems: Iterable[Problem], seed: int = 0) -> list[Problem]:
    """The problems with their choices in an order fixed by (seed, pid), the answer following its choice.

    For training: the data's answer positions are not uniform (in the shared copy's training side, (B) answers
    53% of the two-choice problems; in the validation side 46%), and a small model learns that prior instead of
    the content. The order depends only on the seed and the pid, so every run and every rank sees the same."""
    out = []
    for p in problems:
        order = list(range(len(p.choices)))
        random.Random(f"{seed}:{p.pid}").shuffle(order)
        out.append(_reordered(p, order))
    return out


def rotate_choices(p: Problem, k: int) -> Problem:
    """The problem with its choices rotated by k (choice k comes first), the answer following its choice."""
    n = len(p.choices)
    return _reordered(p, [(j + k) % n for j in range(n)])


def _reordered(p: Problem, order: Sequence[int]) -> Problem:
    """The problem whose j-th choice is the given problem's choice order[j], the answer following its choice."""
    return replace(p, choices=[p.choices[i] for i in order], answer=list(order).index(p.answer))
