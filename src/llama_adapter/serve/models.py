"""What a server holds: one frozen base, and each adapter on a weight-sharing copy of it.

Which adapters share a decode batch (serve/engine.py): the bare base, V1 (text and multimodal)
and LaVIN act through the hooks only, so their rows decode together in one forward pass. V2 and
LoRA change the frozen linears: a V2 adapter without a visual prefix (and a LoRA) is folded at
load time into its own copy of the base (the base's speed, one base's memory more) and decodes
in its own batch; a V2 adapter with a visual prefix stays unfolded on a weight-sharing copy and
decodes in its own batch too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from ..interop import load_adapter
from ..methods.fold import fold
from ..methods.visual import VisualFrontend
from ..model.attached import takes_images
from ..model.fused import fuse_projections
from ..model.llama import LlamaLM
from ..model.load import load_pretrained
from ..model.share import reshare_unchanged, tensor_bytes, weight_sharing_copy, written_base_weights
from ..model.tokenizer import Tokenizer
from ..vision import ImageEncoder
from .config import ServeConfig
from .engine import shares_base
from .prompts import PromptLayout, training_layout

BASE = "base"
SHARED = "shared"  # the decode batch of the base and every adapter that acts through the hooks only


@dataclass
class ServedModel:
    """One name a request can ask for."""

    name: str
    model: LlamaLM
    method: str | None  # None: the bare base
    images: bool  # images reach the model
    layout: PromptLayout
    batch: str  # the decode batch its rows join: SHARED, or its own name
    folded: bool = False
    adapter_bytes: int = 0  # the weights it adds to the server (a folded copy: the whole copy)


def _load_one(base: LlamaLM, tok: Tokenizer, name: str, path: str, force: bool, quantized: bool) -> ServedModel:
    model = weight_sharing_copy(base)
    load_adapter(model, path, tokenizer=tok, force=force)
    reshare_unchanged(base, model)
    written = written_base_weights(base, model)
    if written:  # no method does this today (V2's norms are the copy's own): refuse rather than serve wrong text
        raise ValueError(f"it trains weights of the shared base ({', '.join(written[:3])}, ...), which one server "
                         f"cannot hold per adapter")
    served = ServedModel(name, model, model.adapter.method, takes_images(model), training_layout(path), SHARED)
    if shares_base(model):
        return served
    served.batch = name
    if not served.images and not quantized:  # fold into a copy of its own (base weights included): the base's
        # decode speed; packed weights cannot take the fold, so on a quantized base it stays unfolded
        model = fold(copy.deepcopy(model))
        fuse_projections(model)
        served.model, served.folded = model, True
    return served


def share_encoders(served: dict[str, ServedModel]) -> None:
    """One frozen image encoder per fingerprint (weights, preprocessing, taps) for all adapters: each adapter
    otherwise loads its own copy (an EfficientNet-Lite0 is 14 MB, several times a V1 adapter). Encoders that
    carry trainable parts of their own (LaVIN's ViT adapters) stay separate."""
    first: dict[str, ImageEncoder] = {}
    for s in served.values():
        for frontend in (m for m in s.model.modules() if isinstance(m, VisualFrontend)):
            if not frontend.encoder.has_trainable():
                frontend.encoder = first.setdefault(frontend.encoder.fingerprint(), frontend.encoder)


def count_added_bytes(base: LlamaLM, served: dict[str, ServedModel]) -> None:
    """Set each model's `adapter_bytes`: the tensor memory it adds to the base and the models loaded before it."""
    seen = {t.untyped_storage().data_ptr() for t in [*base.parameters(), *base.buffers()]}
    for s in served.values():
        own = [t for t in [*s.model.parameters(), *s.model.buffers()] if t.untyped_storage().data_ptr() not in seen]
        s.adapter_bytes = tensor_bytes(own)
        seen |= {t.untyped_storage().data_ptr() for t in own}


def load_models(cfg: ServeConfig) -> tuple[LlamaLM, Tokenizer, dict[str, ServedModel]]:
    """The base and every adapter of the config, by served name ("base" and the base's folder name for the base)."""
    base, tok = load_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device or "auto", quantize=cfg.quantize)
    fuse_projections(base)  # before copying: the copies share the fused tensors
    bare = ServedModel(BASE, weight_sharing_copy(base), None, False, PromptLayout(), SHARED)
    served = {BASE: bare}
    for name, path in cfg.adapters.items():
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"adapter {name!r}: {path} does not exist")
        try:
            served[name] = _load_one(base, tok, name, path, cfg.force, cfg.quantize is not None)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"adapter {name!r} ({path}): {e}") from e
    share_encoders(served)
    count_added_bytes(base, served)
    return base, tok, served


def base_aliases(cfg: ServeConfig) -> set[str]:
    """Other names that mean the bare base: the model's own name and its folder's name."""
    return {cfg.model, Path(str(cfg.model)).name} - {""}
