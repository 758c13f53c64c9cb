"""Expert texts computed beforehand and kept in JSON, keyed by image id: ScienceQA's
captions.json ({"captions": {pid: text}}) and ocrs.json ({"texts": {pid: [[box, text, conf], ...]}}),
or a plain {id: text} mapping. An image's id is its folder name (images/<pid>/image.png) or,
failing that, its file stem."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from ..fileio import read_json


class PrecomputedExpert:
    """Texts read from a JSON file (ScienceQA captions.json / ocrs.json, or {id: text}), looked up by image id."""
    def __init__(self, path: str | Path, prefix: str | None = None):
        path = Path(path)
        data = read_json(path, "expert file")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of id -> text")
        if "captions" in data:
            self.texts = {str(k): str(v) for k, v in data["captions"].items()}
            default_prefix = "Image caption: "
        elif "texts" in data:
            self.texts = {str(k): " ".join(str(item[1]) for item in _detections(v, path, k))
                          for k, v in data["texts"].items()}
            default_prefix = "Text in the image: "
        else:
            self.texts = {str(k): str(v) for k, v in data.items()}
            default_prefix = ""
        self.name = f"precomputed:{path.name}"
        self.prefix = default_prefix if prefix is None else prefix

    def key(self, image: Any) -> str:
        """The image's id: its folder name when the file knows it (images/<pid>/image.png), else its stem."""
        p = Path(str(image))
        return p.parent.name if p.parent.name in self.texts else p.stem

    def describe(self, image: Any) -> str:
        """The stored text of `image` after `prefix`; "" when the file has none for it."""
        text = self.texts.get(self.key(image), "").strip()
        return self.prefix + text if text else ""


def _detections(value: Any, path: Path, key: str) -> list:
    """OCR detections [[box, text, confidence], ...]; ScienceQA's ocrs.json stores each list as
    the text of a Python literal, which is parsed as a literal (never evaluated as code)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{path}: entry {key!r} is neither a list nor a list literal: {e}") from e
    if not isinstance(value, (list, tuple)) or any(not isinstance(i, (list, tuple)) or len(i) < 2 for i in value):
        raise ValueError(f"{path}: entry {key!r} is not a list of [box, text, confidence]")
    return list(value)
