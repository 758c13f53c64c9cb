"""Hugging Face Hub ids ("org/name") as model sources: downloaded through huggingface_hub when
online, read from its local cache otherwise, and a clear error at once when neither can serve."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# what a model folder needs: config, weights, tokenizer files (no .bin/.pth duplicates, no ONNX/GGUF variants)
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def looks_like_hub_id(text: str) -> bool:
    return HUB_ID.fullmatch(text) is not None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_reachable(timeout: float = 1.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of `repo_id`'s files (downloading what is missing when the Hub can be reached)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    online = not _offline() and _hub_reachable()
    if online:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=PATTERNS))
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise FileNotFoundError(f"no accessible model {repo_id!r} on the Hugging Face Hub "
                                    f"({type(e).__name__}); check the id, or log in for a gated model") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else f"the Hub ({constants.ENDPOINT}) cannot be reached"
        raise FileNotFoundError(
            f"no local path {repo_id!r} exists, so it is read as a Hugging Face Hub id; it is not in the local cache "
            f"({constants.HF_HUB_CACHE}) and {why}: download it where there is network "
            f"(`hf download {repo_id}`), or give a local folder") from None
