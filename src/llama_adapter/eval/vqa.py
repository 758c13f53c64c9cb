"""Visual question answering accuracy per question type, on LLaVA-format test records that carry
`qtype` and `answer` (the synthetic set's test files). An answer is right when its normalised
text equals the reference; anything else, unparsable included, is wrong."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.multimodal import Conversation, prompt_ids, read_llava, stop_strings
from ..data.synth import normalise_answer
from ..generate import Sampling, complete_ids
from ..model.llama import LlamaLM
from ..model.tokenizer import Tokenizer


@dataclass
class VQAResult:
    """Accuracy overall and per question type, counts per type, and one prediction per record."""
    accuracy: float
    by_type: dict[str, float]
    counts: dict[str, int]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def score(records: list[Conversation], replies: list[str]) -> VQAResult:
    """Compare each reply with its record's answer after `normalise_answer` on both."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    preds = []
    for rec, reply in zip(records, replies):
        qtype, answer = rec.meta["qtype"], str(rec.meta["answer"])
        ok = normalise_answer(reply) == normalise_answer(answer)
        right[qtype] += ok
        total[qtype] += 1
        preds.append({"source": rec.source, "qtype": qtype, "answer": answer, "reply": reply, "correct": ok})
    n = sum(total.values())
    return VQAResult(sum(right.values()) / max(n, 1), {k: right[k] / total[k] for k in sorted(total)},
                     dict(sorted(total.items())), preds)


@torch.no_grad()
def evaluate_vqa(model: LlamaLM, tok: Tokenizer, path: str | Path, template: str = "chat",
                 image_placeholder: str = "", image_override: Callable[[Path], Any] | None = None,
                 qtypes: set[str] | None = None, limit: int | None = None, batch_size: int = 16,
                 max_new_tokens: int = 8) -> VQAResult:
    """Greedy answers to each test question. `image_override` replaces each image (e.g. by a blank
    one, to check that the model really looks)."""
    records = [r for r in read_llava(path) if qtypes is None or r.meta.get("qtype") in qtypes]
    records = records[:limit] if limit else records
    model.eval()
    replies: list[str] = []
    sampling = Sampling(max_new_tokens=max_new_tokens, stop=stop_strings(template))
    for i in range(0, len(records), batch_size):
        chunk = records[i: i + batch_size]
        ids = [prompt_ids(tok, r.turns[0][0], template, image_placeholder, r.image is not None) for r in chunk]
        images = [None if r.image is None else (image_override(r.image) if image_override else r.image)
                  for r in chunk]
        replies += complete_ids(model, tok, ids, sampling, images)
    return score(records, replies)


def evaluate_with_blank_control(model: LlamaLM, tok: Tokenizer, path: str | Path, template: str = "chat",
                                image_placeholder: str = "", **options: Any) -> tuple[VQAResult, VQAResult]:
    """(answers with each image, answers with a uniform grey image of the same size in its place): the
    control that shows the model looks, since without the picture it can only reach chance. The blank
    images are files, so that a feature cache encodes each size once."""
    from ..vision import blank_image, load_image

    looked = evaluate_vqa(model, tok, path, template, image_placeholder, **options)
    with tempfile.TemporaryDirectory(prefix="blank-") as tmp:
        def blank(image: Path) -> Path:
            w, h = load_image(image).size
            file = Path(tmp) / f"blank_{w}x{h}.png"
            if not file.is_file():
                blank_image((w, h)).save(file)
            return file

        return looked, evaluate_vqa(model, tok, path, template, image_placeholder, image_override=blank, **options)
