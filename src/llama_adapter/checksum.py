"""Checksums of saved files: a manifest (`checksums.json`) with the sha256 and size of each file.

A flipped byte, a truncated copy or a file swapped in from another run is refused when loaded,
with the file and what is wrong, instead of training or answering with garbage. Folders saved
before checksums existed have no manifest and load as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .fileio import atomic_write_json, read_json

MANIFEST = "checksums.json"
ALGORITHM = "sha256"


class ChecksumError(ValueError):
    """A file does not match the checksum recorded when it was saved (corrupt, truncated or replaced)."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = read_json(path, "checksum manifest")
    except (ValueError, UnicodeDecodeError) as e:
        raise ChecksumError(f"{path} is corrupt ({e}); the files it protects cannot be verified") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
            for v in files.values()):
        raise ChecksumError(f"{path} is corrupt (not a {ALGORITHM} manifest of files); the files it protects "
                            f"cannot be verified")
    return files


def record_checksums(folder: str | Path, names: Iterable[str]) -> Path:
    """Add (or refresh) the entries of `names` (files in `folder`) in its manifest, written atomically."""
    folder = Path(folder)
    try:
        files = _read_manifest(folder) or {}
    except ChecksumError:
        files = {}  # a corrupt manifest is rebuilt from the files being saved now
    for name in names:
        path = folder / name
        files[name] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return atomic_write_json(folder / MANIFEST, {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))})


def verify_checksums(folder: str | Path, names: Iterable[str] | None = None) -> bool:
    """Check `names` (default: every file the manifest lists) against the manifest of `folder`.

    Returns False when the folder has no manifest (saved before checksums; nothing to check), True
    when every file matches; raises ChecksumError naming the file and what is wrong otherwise."""
    folder = Path(folder)
    files = _read_manifest(folder)
    if files is None:
        return False
    for name in (sorted(files) if names is None else names):
        path = folder / name
        entry = files.get(name)
        if entry is None:
            if path.exists():
                raise ChecksumError(f"{path} is not listed in {folder / MANIFEST}: it was added or replaced after "
                                    f"saving")
            continue
        if not path.is_file():
            raise ChecksumError(f"{path} is missing (the checksum manifest lists it)")
        size = path.stat().st_size
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "longer than saved"
            raise ChecksumError(f"{path} is {what}: {size:,} bytes, {entry['size']:,} when saved")
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise ChecksumError(f"{path} is corrupt or was replaced: its {ALGORITHM} is {digest[:16]}..., "
                                f"{entry['sha256'][:16]}... when saved (if you changed it on purpose, delete "
                                f"{folder / MANIFEST})")
    return True
