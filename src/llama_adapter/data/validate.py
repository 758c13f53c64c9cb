"""Record validation for every data loader: one error type that names the file, the record and the field.

A bad record in row 41,000 must stop the run while the data loads (or, with `data.on_bad_record: skip`,
be logged and left out), never surface as a shape error deep inside a training step or, worse, train
on garbage. The checks are shared so every format says the same thing about the same problem:
missing or mistyped fields, empty or over-long strings, text that is not valid UTF-8, images that are
missing, undecodable or outside the image root.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeVar

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 100_000  # any one string of a record; a longer one is a broken file, not a prompt
ON_BAD_RECORD = ("error", "skip")
T = TypeVar("T")


class DataError(ValueError):
    """A malformed data file or record; the message names the file, the record index and the field."""

    def __init__(self, message: str, path: str | Path | None = None, index: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.path, self.index, self.field = path, index, field


class MissingDataFile(DataError, FileNotFoundError):
    """A data file or an image a record names does not exist (a DataError, and a FileNotFoundError)."""


def where(path: str | Path, index: int) -> str:
    return f"record {index} of {path}"


def _bad_text(value: str) -> str | None:
    """Why a string is not valid text: bytes that were not UTF-8 (read as lone surrogates) or a NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid UTF-8 (bad byte or unpaired surrogate at character {e.start})"
    if "\0" in value:
        return "contains a NUL character"
    return None


def check_all_text(record: Any, path: str | Path, index: int, field: str = "") -> None:
    """Every string anywhere in the record (keys too) must be valid UTF-8 text without NULs."""
    if isinstance(record, str):
        problem = _bad_text(record)
        if problem:
            raise DataError(f"{where(path, index)}: field {field or 'record'!r} {problem}", path, index, field)
    elif isinstance(record, dict):
        for k, v in record.items():
            check_all_text(k, path, index, f"{field}.{k!r}" if field else str(k))
            check_all_text(v, path, index, f"{field}.{k}" if field else str(k))
    elif isinstance(record, list):
        for j, v in enumerate(record):
            check_all_text(v, path, index, f"{field}[{j}]")


def text_field(record: dict[str, Any], key: str, path: str | Path, index: int, *, required: bool = True,
         allow_empty: bool = False, max_chars: int = MAX_TEXT_CHARS, label: str | None = None) -> str:
    """The string field `key` of a record; `label` names it in messages (default: the key)."""
    name = label or key
    w = where(path, index)
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{w} has no string field {name!r}", path, index, name)
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{w}: field {name!r} must be a string, got {type(value).__name__}", path, index, name)
    if not allow_empty and not value.strip():
        raise DataError(f"{w} has no non-empty string field {name!r} (it is empty)", path, index, name)
    if len(value) > max_chars:
        raise DataError(f"{w}: field {name!r} is {len(value):,} characters long; the limit is {max_chars:,}",
                        path, index, name)
    problem = _bad_text(value)
    if problem:
        raise DataError(f"{w}: field {name!r} {problem}", path, index, name)
    return value


class ImageChecker:
    """Resolves a record's image reference inside an image root and checks the file once per path."""

    def __init__(self, root: Path, check_files: bool = True):
        self.root, self.check_files = root, check_files
        self._seen: dict[Path, str | None] = {}  # path -> problem (None: fine)

    def __call__(self, value: Any, path: str | Path, index: int, field: str = "image", w: str | None = None) -> Path:
        """The image file of field `field` of record `index` of `path`; `w`: how messages name the record."""
        w = w or where(path, index)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{w}: field {field!r} must be a non-empty string (a path), got {value!r}", path, index,
                            field)
        problem = _bad_text(value)
        if problem:
            raise DataError(f"{w}: field {field!r} {problem}", path, index, field)
        if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or PureWindowsPath(value).drive:
            raise DataError(f"{w}: field {field!r} is an absolute path ({value!r}); image paths are relative to the "
                            f"image root {self.root}", path, index, field)
        if ".." in PurePosixPath(value.replace("\\", "/")).parts:
            raise DataError(f"{w}: field {field!r} ({value!r}) escapes the image root {self.root} with '..'", path,
                            index, field)
        image = self.root / value
        if self.check_files:
            if image not in self._seen:
                self._seen[image] = _image_problem(image)
            problem = self._seen[image]
            if problem == "missing":
                raise MissingDataFile(f"{w}: image file not found: {image}", path, index, field)
            if problem:
                raise DataError(f"{w}: field {field!r}: {image} {problem}", path, index, field)
        return image


def _image_problem(image: Path) -> str | None:
    """None for a file Pillow recognises as an image (its header is read, not every pixel), else why not."""
    if not image.is_file():
        return "missing"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            im.size  # noqa: B018 -- the header parsed
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"is not a decodable image ({type(e).__name__}: {e})"
    return None


def read_json_document(path: str | Path, what: str = "data file") -> Any:
    """A whole JSON file, decoded so that bytes that are not UTF-8 reach the record that holds them (where
    `check_all_text` names them); a missing file or bad JSON is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataFile(f"{what} not found: {path}", path)
    try:
        return json.loads(path.read_bytes().decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}", path) from e


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(index, record) of a JSON list or a JSON Lines file (.jsonl). The file is decoded so that bytes that are
    not UTF-8 reach the record that holds them (and `check_all_text` names it); an unparsable JSON Lines line is
    a DataError at its record index, yielded in place (so `skip` can step over it)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        data = read_json_document(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}", path)
        yield from enumerate(data)
        return
    if not path.is_file():
        raise MissingDataFile(f"data file not found: {path}", path)
    raw = path.read_bytes().decode("utf-8", errors="surrogateescape")
    index = 0
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines(): U+0085, U+2028 ... may sit inside strings
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as e:
            yield index, DataError(f"{path}:{n}: not valid JSON ({where(path, index)}): {e}", path, index)
        index += 1


class BadRecords:
    """What happens to a record that fails validation: raised (on_bad_record="error") or logged, counted and
    left out ("skip"), with the count reported once the file is read."""

    def __init__(self, path: str | Path, on_bad_record: str):
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, got {on_bad_record!r}")
        self.path, self.policy, self.skipped = path, on_bad_record, 0

    def handle(self, error: DataError) -> None:
        if self.policy == "error":
            raise error
        self.skipped += 1
        log.warning("skipping bad record: %s", error)

    def report(self) -> None:
        if self.skipped:
            log.warning("skipped %d bad record(s) of %s (on_bad_record: skip)", self.skipped, self.path)


def parse_records(path: str | Path, parse: Callable[[int, dict[str, Any]], T], on_bad_record: str = "error",
                  ) -> list[T]:
    """`parse(index, record)` for every record of a data file; each record must be a JSON object of valid text.

    A DataError from a record stops loading (on_bad_record="error") or is logged and the record left out
    ("skip", with the count at the end). A file with no records, or none left, is an error."""
    bad = BadRecords(path, on_bad_record)
    out: list[T] = []
    for i, record in read_records(path):
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(f"{where(path, i)} is not an object", path, i)
            check_all_text(record, path, i)
            out.append(parse(i, record))
        except DataError as e:
            bad.handle(e)
    bad.report()
    if not out:
        raise DataError(f"{path} holds no records" + (f" (all {bad.skipped} were bad)" if bad.skipped else ""), path)
    return out
