"""ScienceQA (Lu et al. 2022): loading, the development protocol, the papers' prompt format, answer parsing,
generated or ranked-choice answers, and accuracy overall and in ScienceQA's eight groups.

Data layouts (`load_scienceqa`):
- official: problems.json (dict pid -> problem), pid_splits.json next to it, images/<split>/<pid>/image.png;
- shared: problems.json whose problems carry their own "split", images/<pid>/image.png.

Development protocol (recipes/scienceqa_dev_protocol.md): the shared copy holds half of the official test
split as "dev" plus pids 1..1773 of train/val. Train on every train/val problem (text only when their images
are not available) plus the dev problems with int(pid) % 4 == 0; validate on the dev problems with
int(pid) % 4 == 2. The other half of the official test split is never tuned on.

Prompt (the layout of LLaMA-Adapter / LaVIN / MM-CoT): "Question: ...\\nContext: ...\\nOptions: (A) x (B) y\\n"
then an instruction line; the context is the hint ("N/A" when empty), with expert texts (captions, OCR)
appended. Target: "The answer is X." or, with fmt="explain", "The answer is X. BECAUSE: <lecture> <solution>".
With answer_form="choice" the answer names the choice's text instead of its letter ("The answer is blue."), with
an instruction line that asks for that.

An answer that cannot be parsed is wrong and counted as unparsed: there is never a random guess.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.multimodal import Conversation, MultimodalExample, collate_multimodal, encode_conversation, prompt_ids
from ..data.tokenize import IGNORE
from ..experts.base import Expert, load_expert, with_context
from ..experts.precomputed import PrecomputedExpert
from ..fileio import atomic_write_json, atomic_write_text, read_json
from ..generate import Sampling, complete_ids
from ..model.llama import LlamaLM
from ..model.tokenizer import Tokenizer
from ..train.trainer import label_logits
from .continuations import continuation_logprobs

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GROUPS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SUBJECT_GROUPS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
ANSWER_INSTRUCTION = 'Answer with "The answer is X." where X is the letter of the correct option.'
CHOICE_INSTRUCTION = 'Answer with "The answer is" followed by the text of the correct option.'
ANSWER_FORMS = {"letter": ANSWER_INSTRUCTION, "choice": CHOICE_INSTRUCTION}  # form -> its instruction line
FORM_INSTRUCTION = "<the answer form's instruction>"  # default `instruction`: the line of ANSWER_FORMS
FORMATS = ("answer", "explain")
MODES = ("generate", "ranked")
MISSING_IMAGES = ("error", "text")


@dataclass
class Problem:
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


def load_scienceqa(problems: str | Path, images: str | Path | None = None, split: str | None = None,
                   pids: Iterable[str | int] | None = None, missing_images: str = "error",
                   pid_splits: str | Path | None = None) -> list[Problem]:
    """Problems from problems.json, in the file's order.

    `images`: the images folder (images/<pid>/image.png or images/<split>/<pid>/image.png); None: no image files
    are looked at (every `image` is None; `has_image` still says which problems have one). A problem whose image
    is missing is an error naming the pid and path, or with missing_images="text" a text-only problem.
    `split`: keep the problems of this split: pid_splits.json's list when that file is present (given, or next
    to problems.json) and names the split, else the problems' own "split" field. `pids`: keep only these."""
    if missing_images not in MISSING_IMAGES:
        raise ValueError(f"missing_images must be one of {', '.join(MISSING_IMAGES)}, got {missing_images!r}")
    path = Path(problems)
    data = read_json(path, "ScienceQA problems file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object pid -> problem")
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
    for pid, r in data.items():
        pid = str(pid)
        if wanted is not None and pid not in wanted:
            continue
        own = r.get("split") if isinstance(r, dict) else None
        psplit = own or split_of.get(pid)
        if split is not None and (pid not in chosen if chosen is not None else psplit != split):
            continue
        out.append(_problem(pid, r, psplit, image_dir, missing_images))
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


# ---------------------------------------------------------------------------------------------------------------
# prompts and targets


def options_text(choices: Sequence[str]) -> str:
    return " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def answer_text(letter: str) -> str:
    return f"The answer is {letter}."


def check_answer_form(answer_form: str) -> str:
    if answer_form not in ANSWER_FORMS:
        raise ValueError(f"unknown answer form {answer_form!r}; choose one of {', '.join(ANSWER_FORMS)}")
    return answer_form


def choice_answer(p: Problem, k: int, answer_form: str = "letter") -> str:
    """The answer naming choice k: "The answer is B." (form "letter", the papers') or "The answer is blue."
    (form "choice": the choice's own text, which a small model can score by content without binding it to a
    letter)."""
    if check_answer_form(answer_form) == "letter":
        return answer_text(LETTERS[k])
    return answer_text(p.choices[k].strip().rstrip("."))


def _experts(experts: Sequence[Expert | str]) -> list[Expert]:
    return [load_expert(e) if isinstance(e, str) else e for e in experts]


def expert_texts(p: Problem, experts: Sequence[Expert]) -> list[str]:
    """The experts' texts about the problem's image. A problem whose image file is not available gets text only
    from precomputed experts (captions.json / ocrs.json are keyed by pid)."""
    if not p.has_image or not experts:
        return []
    if p.image is not None:
        return [e.describe(p.image) for e in experts]
    ref = Path(p.pid) / "image.png"
    return [e.describe(ref) for e in experts if isinstance(e, PrecomputedExpert)]


def question_text(p: Problem, experts: Sequence[Expert] = (), instruction: str | None = FORM_INSTRUCTION,
                  answer_form: str = "letter") -> str:
    """The human turn: question, context (hint plus expert texts; "N/A" when empty), options, instruction (by
    default the answer form's; None: no instruction line)."""
    if instruction == FORM_INSTRUCTION:
        instruction = ANSWER_FORMS[check_answer_form(answer_form)]
    context = with_context(p.hint, expert_texts(p, experts))
    text = f"Question: {p.question.strip()}\nContext: {context or 'N/A'}\nOptions: {options_text(p.choices)}"
    return f"{text}\n{instruction}" if instruction else text


def target_text(p: Problem, fmt: str = "answer", answer_form: str = "letter") -> str:
    """"The answer is X." (fmt "answer") or "The answer is X. BECAUSE: <lecture> <solution>" (fmt "explain").
    With "explain", a problem whose lecture and solution are both null falls back to the answer only (the shared
    copy has none); one that has only one of them uses that one."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown target format {fmt!r}; choose one of {', '.join(FORMATS)}")
    answer = choice_answer(p, p.answer, answer_form)
    if fmt == "answer":
        return answer
    why = " ".join(t.strip() for t in (p.lecture, p.solution) if t and t.strip())
    return f"{answer} BECAUSE: {why}" if why else answer


def scienceqa_conversations(problems: Iterable[Problem], fmt: str = "answer", experts: Sequence[Expert | str] = (),
                            instruction: str | None = FORM_INSTRUCTION,
                            answer_form: str = "letter") -> list[Conversation]:
    """One single-turn Conversation per problem (image path or None), for `encode_conversation` and the trainer."""
    ex = _experts(experts)
    return [Conversation(p.image, [(question_text(p, ex, instruction, answer_form), target_text(p, fmt, answer_form))],
                         f"scienceqa#{p.pid}",
                         {"id": p.pid, "answer": p.answer_letter, "subject": p.subject, "grade": p.grade}, False)
            for p in problems]


def scienceqa_to_llava(problems: Iterable[Problem], out_json: str | Path, fmt: str = "answer",
                       experts: Sequence[Expert | str] = (), instruction: str | None = FORM_INSTRUCTION,
                       image_root: str | Path | None = None, answer_form: str = "letter") -> int:
    """Write LLaVA-style records {"id", "image" (omitted when none), "conversations"} for recipes with
    `format: llava`; image paths are relative to `image_root` (give the recipe the same `data.image_root`),
    else absolute. Returns the number of records."""
    root = Path(image_root).resolve() if image_root is not None else None
    records = []
    for conv in scienceqa_conversations(problems, fmt, experts, instruction, answer_form):
        (human, gpt), = conv.turns
        rec: dict[str, Any] = {"id": conv.meta["id"]}
        if conv.image is not None:
            img = conv.image.resolve()
            rec["image"] = str(img.relative_to(root)) if root is not None else str(img)
        rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        rec.update({k: v for k, v in conv.meta.items() if k != "id"})
        records.append(rec)
    atomic_write_json(out_json, records)
    return len(records)


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
    rows = []
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


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def sees_images(model: LlamaLM) -> bool:
    """Whether the attached method takes images (a text-only model gets the problems as text)."""
    if getattr(model.adapter, "prepare_inputs", None) is None:
        return False
    lavin = getattr(model, "lavin", None)
    return not (lavin is not None and getattr(lavin, "frontend", None) is None)


def _answer_example(tok: Tokenizer, question: str, answer: str, image: Path | None, template: str,
                    image_placeholder: str, source: str, use_image: bool) -> MultimodalExample:
    """The prompt and answer laid out exactly as in training (`encode_conversation`); only the answer's own
    tokens are labelled (the end-of-turn marker is cut off). The image goes to the model when `use_image`."""
    ex = encode_conversation(tok, Conversation(image, [(question, answer)], source), max_len=1 << 30,
                             template=template, image_placeholder=image_placeholder)
    n = len(tok.encode(answer, add_special_tokens=False))
    at = set([i for i, lab in enumerate(ex.labels) if lab != IGNORE][:n])
    end = max(at) + 1
    labels = [lab if i in at else IGNORE for i, lab in enumerate(ex.labels[:end])]
    return MultimodalExample(ex.input_ids[:end], labels, image if use_image else None, source)


@torch.no_grad()
def sequence_logprobs(model: LlamaLM, tok: Tokenizer, examples: Sequence[MultimodalExample]) -> list[float]:
    """Sum of the log-probabilities of each example's labelled tokens, in one batched forward pass laid out as
    the trainer lays it out (the method's `prepare_batch`, which puts the image where training and generation
    put it)."""
    batch = collate_multimodal(list(examples), tok.pad_id).to(model.device)
    logits, targets, rows = label_logits(model, batch)
    logp = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    sums = torch.zeros(len(examples), dtype=torch.float64, device=logp.device).index_add_(0, rows, logp.double())
    return sums.tolist()


def _shared_prompt_logprobs(model: LlamaLM, tok: Tokenizer, rows: Sequence[Sequence[MultimodalExample]],
                            images: Sequence[Any] | None) -> list[list[float]]:
    """`continuation_logprobs` of examples that share their prompt: each cut where its labelled answer begins."""
    prompts, continuations = [], []
    for row in rows:
        cuts = [next(i for i, lab in enumerate(e.labels) if lab != IGNORE) for e in row]
        if len({tuple(e.input_ids[:c]) for e, c in zip(row, cuts)}) != 1:
            raise ValueError(f"{row[0].source}: the answers change how the prompt is tokenised")
        prompts.append(row[0].input_ids[:cuts[0]])
        continuations.append([e.input_ids[c:] for e, c in zip(row, cuts)])
    return continuation_logprobs(model, tok, prompts, continuations, images)


def choice_logprobs(model: LlamaLM, tok: Tokenizer, problems: Sequence[Problem], template: str = "chat",
                    experts: Sequence[Expert | str] = (), batch_size: int = 8, image_placeholder: str = "",
                    instruction: str | None = FORM_INSTRUCTION, images: bool | None = None,
                    answers: Callable[[Problem], Sequence[str]] | None = None,
                    shared_prompt: bool | None = None, answer_form: str = "letter") -> list[list[float]]:
    """Per problem, per choice: log p(answer | prompt), summed over the answer's tokens, the answer being
    `choice_answer` in `answer_form` ("The answer is X." or "The answer is <choice>."); `answers` gives other
    per-choice answer texts to score. With `shared_prompt` (the
    default for models with a KV cache) a prompt runs once for all its choices (`continuation_logprobs`, 2.2x
    faster on ScienceQA); otherwise each choice is a full sequence in the training layout, which any
    model the trainer drives can score. Problems are batched in order of prompt length, so that a batch pads
    little (prompts run from 60 to 500 tokens)."""
    ex = _experts(experts)
    use_images = sees_images(model) if images is None else images
    shared = hasattr(model, "new_cache") if shared_prompt is None else shared_prompt
    model.eval()
    rows: list[list[MultimodalExample]] = []
    for p in problems:
        q = question_text(p, ex, instruction, answer_form)
        texts = answers(p) if answers else [choice_answer(p, k, answer_form) for k in range(len(p.choices))]
        rows.append([_answer_example(tok, q, a, p.image, template, image_placeholder, f"scienceqa#{p.pid}/{LETTERS[k]}",
                                     use_images) for k, a in enumerate(texts)])
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0].input_ids))
    out: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        if shared:
            imgs = [problems[i].image for i in chunk] if use_images else None
            scores = _shared_prompt_logprobs(model, tok, [rows[i] for i in chunk], imgs)
        else:
            flat = sequence_logprobs(model, tok, [r for i in chunk for r in rows[i]])
            scores = []
            for i in chunk:
                scores.append(flat[:len(rows[i])])
                flat = flat[len(rows[i]):]
        for i, s in zip(chunk, scores):
            out[i] = s
    return out


def evaluate_scienceqa(model: LlamaLM, tok: Tokenizer, problems: Sequence[Problem], mode: str = "generate",
                       template: str = "chat", experts: Sequence[Expert | str] = (), batch_size: int = 8,
                       image_placeholder: str = "", instruction: str | None = FORM_INSTRUCTION,
                       max_new_tokens: int = 16, images: bool | None = None, circular: bool = False,
                       answer_form: str = "letter") -> ScienceQAResult:
    """Accuracy on `problems`. mode "generate": greedy replies, parsed by `parse_answer` (unparsable = wrong);
    "ranked": the choice whose answer the model finds most likely, the answer naming the choice by letter
    ("The answer is X.", `answer_form` "letter") or by its text ("choice"). `images`: pass the images to the
    model (default: when the attached method takes images). The prompt is laid out by `prompt_ids` with
    `template` ("chat" or "plain"), as the same conversations are laid out in training.

    `circular` (MMBench's circular evaluation): each problem is asked once per rotation of its choices and is
    right only when every answer names the right choice, so a preference for a letter earns nothing. Each
    prediction row keeps the pick under the given order ("prediction") and, as indices into the given choices,
    the pick under every rotation ("circular_picks")."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    problems = list(problems)
    if not problems:
        raise ValueError("no ScienceQA problems to evaluate")
    ex = _experts(experts)
    check_answer_form(answer_form)
    use_images = sees_images(model) if images is None else images
    model.eval()
    asked = [rotate_choices(p, k) for p in problems for k in range(len(p.choices))] if circular else problems
    if mode == "ranked":
        scores = choice_logprobs(model, tok, asked, template, ex, batch_size, image_placeholder, instruction,
                                 use_images, answer_form=answer_form)
        preds: list[int | None] = [max(range(len(s)), key=s.__getitem__) for s in scores]
        replies = [choice_answer(p, k, answer_form) for p, k in zip(asked, preds) if k is not None]  # never None
        extra = [{"logprobs": s} for s in scores]
    else:
        preds, replies = _generated_answers(model, tok, asked, template, ex, batch_size, image_placeholder,
                                            instruction, max_new_tokens, use_images, answer_form)
        extra = [{} for _ in asked]
    if not circular:
        return replace(score(problems, preds, replies, mode, extra), answer_form=answer_form)
    rows, correct, first, at = [], [], [], 0
    for p in problems:
        n = len(p.choices)
        picks = [None if preds[at + k] is None else (preds[at + k] + k) % n for k in range(n)]
        rows.append({**extra[at], "circular_picks": picks})
        correct.append(all(pick == p.answer for pick in picks))
        first.append(at)
        at += n
    result = score(problems, [preds[i] for i in first], [replies[i] for i in first], mode, rows, correct)
    return replace(result, answer_form=answer_form)


def _generated_answers(model: LlamaLM, tok: Tokenizer, problems: Sequence[Problem], template: str,
                       experts: Sequence[Expert], batch_size: int, image_placeholder: str, instruction: str | None,
                       max_new_tokens: int, use_images: bool,
                       answer_form: str) -> tuple[list[int | None], list[str]]:
    """Greedy replies and the choices they name (None: unparsable)."""
    stop = ("\n### Human:",) if template == "plain" else ()
    sampling = Sampling(max_new_tokens=max_new_tokens, stop=stop)
    replies = []
    with torch.no_grad():
        for i in range(0, len(problems), batch_size):
            chunk = problems[i: i + batch_size]
            ids = [prompt_ids(tok, question_text(p, experts, instruction, answer_form), template, image_placeholder,
                              p.image is not None) for p in chunk]
            imgs = [p.image for p in chunk] if use_images else None
            replies += complete_ids(model, tok, ids, sampling, imgs)
    return [parse_answer(r, p.choices) for r, p in zip(replies, problems)], replies


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
