"""Running a model on ScienceQA: generated answers, ranked choices (log-probabilities), circular evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...batch import IGNORE
from ...data.multimodal import Conversation, MultimodalExample, collate_multimodal, encode_conversation, prompt_ids
from ...experts.base import Expert
from ...generate import Sampling, complete_ids
from ...loss import label_logits
from ...model.attached import takes_images
from ...model.llama import LlamaLM
from ...model.tokenizer import Tokenizer
from ..continuations import continuation_logprobs
from .loading import LETTERS, Problem, rotate_choices
from .prompts import FORM_INSTRUCTION, _experts, check_answer_form, choice_answer, question_text
from .scoring import ScienceQAResult, parse_answer, score

MODES = ("generate", "ranked")


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def sees_images(model: LlamaLM) -> bool:
    """Whether the attached method takes images (a text-only model gets the problems as text)."""
    return takes_images(model)


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
        picks = [None if (pick := preds[at + k]) is None else (pick + k) % n for k in range(n)]
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
