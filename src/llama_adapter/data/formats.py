"""Readers for instruction data formats; every error names the file and the record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import read_json


@dataclass
class InstructionRecord:
    instruction: str
    input: str
    output: str
    source: str  # "file#index", for error messages


def read_json_records(path: str | Path) -> list[Any]:
    """A JSON list, or JSON Lines (one object per line)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        data = read_json(path, "data file")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
    return records


def object_records(path: str | Path) -> list[tuple[int, str, dict[str, Any]]]:
    """(index, "record i of FILE", record) for every record of a file of JSON objects; an empty
    file or a record that is not an object is an error naming it."""
    records = read_json_records(path)
    if not records:
        raise ValueError(f"{path} holds no records")
    out = []
    for i, r in enumerate(records):
        where = f"record {i} of {path}"
        if not isinstance(r, dict):
            raise ValueError(f"{where} is not an object")
        out.append((i, where, r))
    return out


def read_alpaca(path: str | Path) -> list[InstructionRecord]:
    """Alpaca records {instruction, input (optional), output}."""
    out = []
    for i, where, r in object_records(path):
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{where} has no string field {key!r}")
        inp = r.get("input", "") or ""
        if not isinstance(inp, str):
            raise ValueError(f"{where}: field 'input' is not a string")
        out.append(InstructionRecord(r["instruction"], inp, r["output"], f"{path}#{i}"))
    return out
