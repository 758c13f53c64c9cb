"""A data source of a recipe: a file, its format, and the data kind its batches have.

Kinds matter for joint training: each kind trains its own parameter groups (see the
trainer). Formats: Alpaca instructions, LLaVA conversations, caption pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ..model.tokenizer import Tokenizer
from .formats import read_alpaca
from .instructions import encode_records, report_long_prompts
from .multimodal import MM_TEMPLATES, caption_conversation, encode_conversation, read_captions, read_llava
from .tokenize import Example, PromptTooLong
from .validate import ON_BAD_RECORD

FORMATS = ("alpaca", "llava", "captions")


@dataclass
class DataConfig:
    """One data source of a recipe: its files, format, data kind, template and length limits."""
    train: str = ""
    format: str = "alpaca"  # "alpaca", "llava" (conversations, images optional), "captions" (JSONL image+caption)
    kind: str = ""  # data kind (default: "instruction" for alpaca, "vqa" for llava, "caption" for captions)
    val: str | None = None
    val_size: int = 0  # with no val file: hold out this many training records (the last ones)
    template: str = ""  # alpaca: "alpaca" or "chat"; llava/captions: "chat" or "plain" (default: first)
    image_root: str | None = None  # folder image paths are relative to (default: the file's folder)
    image_placeholder: str = ""  # text put where the image is (e.g. "Image: <image>\n"); "" for none
    caption_instruction: str = "Describe the image briefly."
    max_len: int = 512
    on_long_prompt: str = "error"  # "error", or "skip" (and report the records)
    on_bad_record: str = "error"  # a malformed record: "error" (naming it), or "skip" (logging each and the count)
    limit: int | None = None  # use only the first N records

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown data format {self.format!r}; choose one of {', '.join(FORMATS)}")
        templates = ("alpaca", "chat") if self.format == "alpaca" else MM_TEMPLATES
        self.template = self.template or templates[0]
        if self.template not in templates:
            raise ValueError(f"template {self.template!r} does not fit format {self.format!r}; "
                             f"choose one of {', '.join(templates)}")
        self.kind = self.kind or {"alpaca": "instruction", "llava": "vqa", "captions": "caption"}[self.format]
        if self.on_long_prompt not in ("error", "skip"):
            raise ValueError(f"on_long_prompt must be 'error' or 'skip', got {self.on_long_prompt!r}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, got {self.on_bad_record!r}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")


def _read(cfg: DataConfig, path: str) -> list:
    bad = cfg.on_bad_record
    if cfg.format == "alpaca":
        return read_alpaca(Path(path), on_bad_record=bad)
    if cfg.format == "llava":
        return read_llava(path, image_root=cfg.image_root, on_bad_record=bad)
    return [caption_conversation(r, cfg.caption_instruction)
            for r in read_captions(path, image_root=cfg.image_root, on_bad_record=bad)]


def _encode(cfg: DataConfig, tok: Tokenizer, records: list) -> list[Example]:
    if cfg.format == "alpaca":
        return encode_records(records, tok, cfg)
    out, too_long = [], []
    for conv in records:
        try:
            out.append(encode_conversation(tok, conv, cfg.max_len, cfg.template, cfg.image_placeholder, cfg.kind))
        except PromptTooLong as e:
            too_long.append(str(e))
    report_long_prompts(too_long, cfg)
    # a MultimodalExample has every field of an Example (ids, labels, source, kind) plus its image, which
    # collate_multimodal reads: the trainer takes both kinds as Examples
    return cast(list[Example], out)


def load_source(cfg: DataConfig, tok: Tokenizer) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples of one source."""
    if not cfg.train:
        raise ValueError("data.train is not set: give the path of a data file")
    records = _read(cfg, cfg.train)
    if cfg.limit:
        records = records[: cfg.limit]
    if cfg.val:
        val_records = _read(cfg, cfg.val)
    elif cfg.val_size:
        if cfg.val_size >= len(records):
            raise ValueError(f"val_size={cfg.val_size} leaves no training records out of {len(records)}")
        records, val_records = records[: -cfg.val_size], records[-cfg.val_size:]
    else:
        val_records = []
    return _encode(cfg, tok, records), _encode(cfg, tok, val_records)
