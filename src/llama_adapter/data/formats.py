"""Readers for instruction data formats; every error names the file and the record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import read_json, read_json_lines


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
    return [record for _, record in read_json_lines(path, "data file")]


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
