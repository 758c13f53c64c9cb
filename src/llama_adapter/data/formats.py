"""Readers for instruction data formats; every error names the file and the record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .validate import parse_records, text_field


@dataclass
class InstructionRecord:
    """One Alpaca record: instruction, optional input, the expected output, and where it came from."""
    instruction: str
    input: str
    output: str
    source: str  # "file#index", for error messages


def read_alpaca(path: str | Path, on_bad_record: str = "error") -> list[InstructionRecord]:
    """Alpaca records {instruction, input (optional), output}, each validated (data.validate: a DataError naming
    the record and field; on_bad_record="skip" logs and leaves out bad records)."""
    def parse(i: int, r: dict[str, Any]) -> InstructionRecord:
        instruction, output = text_field(r, "instruction", path, i), text_field(r, "output", path, i)
        given = text_field(r, "input", path, i, required=False, allow_empty=True)
        return InstructionRecord(instruction, given, output, f"{path}#{i}")

    return parse_records(path, parse, on_bad_record)
