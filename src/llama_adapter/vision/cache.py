"""On-disk cache of frozen-encoder features, so each image is encoded once for all epochs.

Layout: root/<encoder fingerprint>/<image sha256>.safetensors, one file per image. Keys are
file contents and encoder weights+preprocessing, so renamed images still hit and a changed
encoder never reads stale features. Files are written atomically; a damaged one is recomputed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .features import ImageEncoder, VisionFeatures
from .images import image_digest, load_image


def _atomic_write(path: Path, write: Callable[..., object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    """Per-image VisionFeatures of one frozen encoder, computed on first use and read from disk after.

    `get(paths)` returns CPU features (fp32 as computed) batched in the order given; `hits` and
    `misses` count images served from disk and encoded. Features of an encoder with trainable
    parts (e.g. LaVIN's in-encoder adapters) change while training and are refused.
    """

    def __init__(self, root: str | os.PathLike, encoder: ImageEncoder, batch_size: int = 16) -> None:
        if encoder.has_trainable():
            raise ValueError(f"{encoder.name} has trainable parameters or adapters: its features change during "
                             f"training and cannot be cached")
        self.encoder = encoder
        self.batch_size = batch_size
        self.fingerprint = encoder.fingerprint()
        self.folder = Path(root) / self.fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "encoder.json"
        if not info.is_file():
            meta = {"name": encoder.name, "global_dims": encoder.global_dims, "token_dim": encoder.token_dim,
                    "n_tokens": encoder.n_tokens, "image_size": encoder.image_size}
            _atomic_write(info, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
        self.hits = 0
        self.misses = 0
        self._digests: dict[tuple[str, int, int], str] = {}

    def path_for(self, digest: str) -> Path:
        """Where the features of the image with this sha256 digest are (or will be) stored."""
        return self.folder / f"{digest}.safetensors"

    def _digest(self, src: str | os.PathLike | bytes) -> str:
        if isinstance(src, (bytes, bytearray)):
            return image_digest(src)
        path = Path(src)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key not in self._digests:
            self._digests[key] = image_digest(path)
        return self._digests[key]

    def _read(self, digest: str) -> VisionFeatures | None:
        """Stored features, or None when absent, unreadable or of the wrong shape."""
        path = self.path_for(digest)
        if not path.is_file():
            return None
        try:
            feats = VisionFeatures.from_state_dict(load_file(str(path)))
        except Exception:  # any damage means "recompute"
            return None
        enc = self.encoder
        ok = (feats.batch_size == 1 and [g.shape[1] for g in feats.globals] == list(enc.global_dims)
              and tuple(feats.tokens.shape[1:]) == (enc.n_tokens, enc.token_dim))
        return feats if ok else None

    def _compute(self, sources: list) -> list[VisionFeatures]:
        out: list[VisionFeatures] = []
        for start in range(0, len(sources), self.batch_size):
            images = [load_image(s) for s in sources[start:start + self.batch_size]]
            with torch.no_grad():
                out.extend(self.encoder.encode(images).to("cpu").split())
        return out

    def get(self, images: Sequence[str | os.PathLike | bytes]) -> VisionFeatures:
        """Features for `images` (paths or raw bytes), batched in order; encodes only what is missing."""
        if not images:
            raise ValueError("FeatureCache.get needs at least one image")
        digests = [self._digest(src) for src in images]
        found: dict[str, VisionFeatures] = {}
        todo: dict[str, str | os.PathLike | bytes] = {}
        for src, d in zip(images, digests):
            if d in found or d in todo:
                continue
            feats = self._read(d)
            if feats is None:
                todo[d] = src
            else:
                found[d] = feats
        self.hits += len(found)
        self.misses += len(todo)
        if todo:
            for d, feats in zip(todo, self._compute(list(todo.values()))):
                sd = feats.state_dict()
                _atomic_write(self.path_for(d), lambda p, sd=sd, d=d: save_file(sd, p, metadata={"image_sha256": d}))
                found[d] = feats
        return VisionFeatures.cat([found[d] for d in digests])
