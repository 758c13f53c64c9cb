"""ScienceQA prompts and targets: the question text with its context and options, and the answer texts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ...data.multimodal import Conversation
from ...experts.base import Expert, load_expert, with_context
from ...experts.precomputed import PrecomputedExpert
from ...fileio import atomic_write_json
from .loading import LETTERS, Problem

ANSWER_INSTRUCTION = 'Answer with "The answer is X." where X is the letter of the correct option.'
CHOICE_INSTRUCTION = 'Answer with "The answer is" followed by the text of the correct option.'
ANSWER_FORMS = {"letter": ANSWER_INSTRUCTION, "choice": CHOICE_INSTRUCTION}  # form -> its instruction line
FORM_INSTRUCTION = "<the answer form's instruction>"  # default `instruction`: the line of ANSWER_FORMS
FORMATS = ("answer", "explain")


# ---------------------------------------------------------------------------------------------------------------
# prompts and targets


def options_text(choices: Sequence[str]) -> str:
    """"(A) x (B) y": the options line of the prompt."""
    return " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def answer_text(letter: str) -> str:
    """"The answer is X." for a letter (or a choice's text)."""
    return f"The answer is {letter}."


def check_answer_form(answer_form: str) -> str:
    """`answer_form` itself when it is one of ANSWER_FORMS, else a clear error."""
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
