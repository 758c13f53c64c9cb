"""Multimodal data: LLaVA conversations and captions -> typed records -> token ids with label masks -> batches.

Records name their file and index in every error. Images stay paths here: the method encodes them (and puts
the visual embedding wherever it wants); the text only carries an optional, configurable marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.tokenizer import Tokenizer
from .tokenize import IGNORE, Batch, PromptTooLong, collate
from .validate import DataError, ImageChecker, parse_records, text_field, where

IMAGE_TAG = "<image>"
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}  # LLaVA names, and chat aliases
PLAIN_HUMAN = "### Human: {text}\n### Assistant: "  # the plain template; each reply ends with EOS
PLAIN_SEP = "\n"  # between a reply's EOS and the next "### Human:"
MM_TEMPLATES = ("chat", "plain")


def stop_strings(template: str) -> tuple[str, ...]:
    """Where a reply ends when a model runs on past its EOS: the plain template's next turn."""
    return ("###",) if template == "plain" else ()


@dataclass
class Conversation:
    """One LLaVA record. The first human turn of a record with an image always refers to it: a record
    without an explicit `<image>` tag gets it implicitly at the start (`image_tag` says which it was)."""

    image: Path | None  # None: a text-only record
    turns: list[tuple[str, str]]  # (human, gpt) pairs, `<image>` removed
    source: str  # "file#index", for error messages
    meta: dict[str, Any] = field(default_factory=dict)  # other top-level fields: id, qtype, answer, ...
    image_tag: bool = False  # the first human turn carried `<image>` explicitly


@dataclass
class CaptionRecord:
    """One image-caption pair of a captions file (image path resolved), and where it came from."""
    image: Path
    caption: str
    source: str


def _strip_tag(text: str) -> str:
    """Remove `<image>` wherever it is; the pieces around it are joined by a newline."""
    return "\n".join(p.strip() for p in text.split(IMAGE_TAG) if p.strip())


def _parse_turns(conv: Any, where: str, has_image: bool) -> tuple[list[tuple[str, str]], bool]:
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list")
    texts = []
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise ValueError(f"{where}: turn {j} must be an object with a string 'value'")
        role, expected = ROLES.get(msg.get("from", "")), ("human", "gpt")[j % 2]
        if role != expected:
            raise ValueError(f"{where}: turn {j} is from {msg.get('from')!r}, expected {expected!r} "
                             f"(turns alternate human, gpt, starting with human)")
        n_tags = msg["value"].count(IMAGE_TAG)
        if n_tags and j > 0:
            raise ValueError(f"{where}: turn {j} contains {IMAGE_TAG}; it is only allowed in the first human turn")
        if n_tags > 1:
            raise ValueError(f"{where}: the first turn contains {IMAGE_TAG} {n_tags} times; one image per record")
        if n_tags and not has_image:
            raise ValueError(f"{where}: the first turn contains {IMAGE_TAG} but the record has no 'image'")
        texts.append(_strip_tag(msg["value"]) if j == 0 else msg["value"])
    if len(texts) % 2:
        raise ValueError(f"{where}: the last turn is from 'human' and has no 'gpt' reply")
    return list(zip(texts[0::2], texts[1::2])), IMAGE_TAG in conv[0]["value"]


def read_llava(path: str | Path, image_root: str | Path | None = None, check_files: bool = True,
               on_bad_record: str = "error") -> list[Conversation]:
    """LLaVA conversation records (JSON list or JSONL); image paths relative to `image_root` (default: the folder
    of the file), never outside it. Each record is validated (data.validate: a DataError naming the record and
    field; on_bad_record="skip" logs and leaves out bad records)."""
    path = Path(path)
    images = ImageChecker(Path(image_root) if image_root is not None else path.parent, check_files)

    def parse(i: int, r: dict[str, Any]) -> Conversation:
        w = where(path, i) + (f" (id {r['id']!r})" if "id" in r else "")
        image = None if r.get("image") is None else images(r["image"], path, i, w=w)
        conv = r.get("conversations")
        try:
            turns, tag = _parse_turns(conv, w, image is not None)
        except DataError:
            raise
        except ValueError as e:
            raise DataError(str(e), path, i, "conversations") from e
        for j, msg in enumerate(conv if isinstance(conv, list) else []):
            text_field(msg, "value", path, i, allow_empty=j % 2 == 0, label=f"conversations[{j}].value")
        meta = {k: v for k, v in r.items() if k not in ("image", "conversations")}
        return Conversation(image, turns, f"{path}#{i}", meta, tag)

    return parse_records(path, parse, on_bad_record)


def read_captions(path: str | Path, image_root: str | Path | None = None, check_files: bool = True,
                  on_bad_record: str = "error") -> list[CaptionRecord]:
    """Records {"image", "caption"} (JSONL or a JSON list); image paths and validation as in `read_llava`."""
    path = Path(path)
    images = ImageChecker(Path(image_root) if image_root is not None else path.parent, check_files)

    def parse(i: int, r: dict[str, Any]) -> CaptionRecord:
        caption = text_field(r, "caption", path, i)
        return CaptionRecord(images(r.get("image"), path, i), caption, f"{path}#{i}")

    return parse_records(path, parse, on_bad_record)


def caption_conversation(rec: CaptionRecord, instruction: str = "Describe the image briefly.") -> Conversation:
    """A caption as a one-turn conversation, so captions and VQA share one encoder."""
    return Conversation(rec.image, [(instruction, rec.caption)], rec.source, {}, False)


@dataclass
class MultimodalExample:
    """One tokenized conversation with its image: the Example fields plus the image path (None: text only)."""
    input_ids: list[int]
    labels: list[int]  # IGNORE on human turns and template text; the replies and their end-of-turn are trained
    image: Path | None  # None: text only
    source: str
    kind: str = "vqa"


@dataclass
class MultimodalBatch(Batch):
    """A Batch plus one image path (or None) per row; the method turns paths into visual features."""

    images: list[Path | None]
    has_image: torch.Tensor  # bool [B]

    def to(self, device: torch.device) -> MultimodalBatch:
        """The batch with its tensors on `device` (image paths stay paths)."""
        return MultimodalBatch(self.input_ids.to(device), self.labels.to(device), self.kind, self.n_label_tokens,
                               self.images, self.has_image.to(device))


def collate_multimodal(examples: Sequence[Any], pad_id: int) -> MultimodalBatch:
    """Right-padded like `collate`; plain text `Example`s count as having no image. Kind: the examples'
    common kind, or "mixed"."""
    b = collate(list(examples), pad_id)
    images = [getattr(e, "image", None) for e in examples]
    kinds = {e.kind for e in examples}
    return MultimodalBatch(b.input_ids, b.labels, kinds.pop() if len(kinds) == 1 else "mixed", b.n_label_tokens,
                           images, torch.tensor([im is not None for im in images], dtype=torch.bool))


def _eos(tok: Tokenizer) -> int:
    return tok.hf.eos_token_id if tok.hf.eos_token_id is not None else min(tok.eos_ids)


def _pieces(tok: Tokenizer, turns: Sequence[tuple[str, str | None]], template: str,
            source: str) -> list[tuple[list[int], bool]]:
    """(token ids, trained) pieces; a final turn with reply None ends with the open generation prompt.

    Each piece is tokenized on its own so the label boundaries are exact. Replies are trained with their
    end-of-turn marker (the chat template's, trailing whitespace excluded; EOS appended if it has none)."""
    out: list[tuple[list[int], bool]] = []
    if template == "plain":
        for j, (human, reply) in enumerate(turns):
            text = ("" if j == 0 else PLAIN_SEP) + PLAIN_HUMAN.format(text=human)
            out.append((tok.encode(text, add_special_tokens=j == 0), False))
            if reply is not None:
                out.append((tok.encode(reply, add_special_tokens=False) + [_eos(tok)], True))
        return out
    if template != "chat":
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(MM_TEMPLATES)}")
    messages: list[dict[str, str]] = []
    done, carry = "", ""  # text rendered so far; whitespace after the last reply, owed to the next prompt
    for human, reply in turns:
        messages.append({"role": "user", "content": human})
        prompt = tok.chat_prompt(messages, add_generation_prompt=True)
        if not prompt.startswith(done):
            raise ValueError(f"{source}: the chat template does not render turns as prefixes of each other; "
                             f"use template 'plain'")
        out.append((tok.encode(carry + prompt[len(done):], add_special_tokens=False), False))
        if reply is None:
            break
        messages.append({"role": "assistant", "content": reply})
        full = tok.chat_prompt(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(f"{source}: the chat template does not render turns as prefixes of each other; "
                             f"use template 'plain'")
        answer = full[len(prompt):]
        trained = answer.rstrip()
        ids = tok.encode(trained, add_special_tokens=False)
        if not tok.eos_ids.intersection(ids):
            ids.append(_eos(tok))
        out.append((ids, True))
        done, carry = full, answer[len(trained):]
    return out


def _with_marker(turns: Sequence[tuple[str, str | None]], image_placeholder: str,
                 has_image: bool) -> list[tuple[str, str | None]]:
    turns = list(turns)
    if has_image and image_placeholder and turns:
        turns[0] = (image_placeholder + turns[0][0], turns[0][1])
    return turns


def encode_conversation(tok: Tokenizer, conv: Conversation, max_len: int, template: str = "chat",
                        image_placeholder: str = "", kind: str = "vqa") -> MultimodalExample:
    """Token ids with loss on every gpt turn. `image_placeholder` (e.g. "Image: <image>\\n") is prefixed to
    the first human turn of records with an image; default none. A first prompt that fills `max_len` is
    `PromptTooLong` naming the record; later turns are truncated at `max_len`."""
    pieces = _pieces(tok, _with_marker(conv.turns, image_placeholder, conv.image is not None), template, conv.source)
    if len(pieces[0][0]) >= max_len:
        raise PromptTooLong(f"{conv.source}: the prompt alone is {len(pieces[0][0])} tokens, which fills the "
                            f"maximum length of {max_len}; nothing of the response would be trained on")
    ids = [t for p, _ in pieces for t in p]
    labels = [t if trained else IGNORE for p, trained in pieces for t in p]
    return MultimodalExample(ids[:max_len], labels[:max_len], conv.image, conv.source, kind)


def prompt_ids(tok: Tokenizer, question: str, template: str = "chat", image_placeholder: str = "",
               has_image: bool = True, history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The token ids to generate the reply to `question` from, laid out exactly as in training."""
    turns: list[tuple[str, str | None]] = [*history, (question, None)]
    return [t for p, _ in _pieces(tok, _with_marker(turns, image_placeholder, has_image), template, "prompt")
            for t in p]
