"""What every image encoder returns (`VisionFeatures`) and the interface encoders implement (`ImageEncoder`).

Every encoder returns `VisionFeatures`: a list of global vectors (one per tapped layer/stage:
the multi-scale features of V1 and LaVIN's per-layer [CLS] tokens) and a grid of tokens (V2's
visual-query input), so projectors and caches need not know the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from .images import ImageSource, load_image


@dataclass
class VisionFeatures:
    """What an encoder saw: `globals[i]` is [B, D_i] for tap i, `tokens` is [B, N, D_tok]."""

    globals: list[torch.Tensor]
    tokens: torch.Tensor

    def __post_init__(self) -> None:
        b = self.tokens.shape[0]
        if self.tokens.dim() != 3 or any(g.dim() != 2 or g.shape[0] != b for g in self.globals):
            shapes = [tuple(g.shape) for g in self.globals]
            raise ValueError(f"inconsistent VisionFeatures: globals {shapes}, tokens {tuple(self.tokens.shape)}")

    @property
    def batch_size(self) -> int:
        """Number of images (B)."""
        return self.tokens.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def to(self, *args: Any, **kwargs: Any) -> VisionFeatures:
        """Like Tensor.to (device and/or dtype), applied to every tensor."""
        return VisionFeatures([g.to(*args, **kwargs) for g in self.globals], self.tokens.to(*args, **kwargs))

    def detach(self) -> VisionFeatures:
        """The same features cut from the autograd graph."""
        return VisionFeatures([g.detach() for g in self.globals], self.tokens.detach())

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> VisionFeatures:
        """Select examples; an int keeps the batch dimension (a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return VisionFeatures([g[index] for g in self.globals], self.tokens[index])

    def split(self) -> list[VisionFeatures]:
        """One batch-of-one VisionFeatures per example (what the cache stores per image)."""
        return [self[i] for i in range(self.batch_size)]

    @classmethod
    def cat(cls, items: Sequence[VisionFeatures]) -> VisionFeatures:
        """Concatenate along the batch dimension (inverse of `split`)."""
        if not items:
            raise ValueError("VisionFeatures.cat needs at least one item")
        n = len(items[0].globals)
        if any(len(it.globals) != n for it in items):
            raise ValueError("VisionFeatures.cat: items have different numbers of global taps")
        globals_ = [torch.cat([it.globals[i] for it in items]) for i in range(n)]
        return cls(globals_, torch.cat([it.tokens for it in items]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat, contiguous, unshared tensors: the safetensors layout of the cache."""
        out = {f"global.{i}": g.detach().contiguous().clone() for i, g in enumerate(self.globals)}
        out["tokens"] = self.tokens.detach().contiguous().clone()
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> VisionFeatures:
        """Inverse of `state_dict`; names the missing keys of an incomplete one."""
        n = sum(1 for k in sd if k.startswith("global."))
        missing = [k for k in [f"global.{i}" for i in range(n)] + ["tokens"] if k not in sd]
        if missing:
            raise ValueError(f"VisionFeatures state dict lacks {missing}")
        return cls([sd[f"global.{i}"] for i in range(n)], sd["tokens"])


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ImageEncoder(nn.Module):
    """Base class: a frozen backbone plus its own preprocessing.

    Frozen means requires_grad False and eval mode (batch norm statistics and dropout stay as
    trained even when a parent module calls .train()). `forward` does not disable autograd,
    because LaVIN trains adapters inside ViT blocks; wrap calls in torch.no_grad() when
    nothing inside the encoder trains.
    """

    name: str
    global_dims: list[int]
    token_dim: int
    n_tokens: int
    image_size: int

    def __init__(self) -> None:
        super().__init__()
        self._weights_digest: tuple[str, str] | None = None

    # -- to implement -------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> float pixels [B, 3, H, W] (PIL and numpy only, no torchvision)."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> VisionFeatures:  # pragma: no cover - abstract
        """Preprocessed pixels [B, 3, H, W] -> VisionFeatures."""
        raise NotImplementedError

    def _preprocess_config(self) -> dict:
        """Everything besides the weights that changes the features (for the fingerprint)."""
        raise NotImplementedError

    def _backbone(self) -> nn.Module:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def encode(self, images: Sequence[ImageSource]) -> VisionFeatures:
        """Load (if needed), preprocess and run a list of images."""
        imgs = [im if isinstance(im, Image.Image) and im.mode == "RGB" else load_image(im) for im in images]
        if not imgs:
            raise ValueError("encode() needs at least one image")
        p = next(self._backbone().parameters())
        return self(self.preprocess(imgs).to(device=p.device, dtype=p.dtype))

    def freeze(self) -> ImageEncoder:
        """Make the backbone untrainable and put the encoder in eval mode."""
        for p in self._backbone().parameters():
            p.requires_grad_(False)
        self.train(False)
        return self

    def adapters(self) -> dict[int, nn.Module]:
        """Modules set with set_pre_attention_adapter, by block index (none for a CNN)."""
        return {}

    def train(self, mode: bool = True) -> ImageEncoder:
        """The backbone always stays in eval mode; inserted adapters follow `mode`."""
        super().train(mode)
        self._backbone().eval()
        for module in self.adapters().values():
            module.train(mode)
        return self

    def has_trainable(self) -> bool:
        """True when features depend on trainable state (then they must not be cached)."""
        return bool(self.adapters()) or any(p.requires_grad for p in self.parameters())

    def _base_state(self) -> dict[str, torch.Tensor]:
        marker = ".pre_attention_adapter."
        return {k: v for k, v in self._backbone().state_dict().items() if marker not in f".{k}"}

    def fingerprint(self) -> str:
        """16 hex digits identifying weights, dtype, preprocessing and taps (cache invalidation)."""
        dtype = str(next(self._backbone().parameters()).dtype)
        if self._weights_digest is None or self._weights_digest[0] != dtype:
            self._weights_digest = (dtype, _tensor_digest(self._base_state()))
        meta = {"class": type(self).__name__, "weights": self._weights_digest[1],
                "preprocess": self._preprocess_config(), "global_dims": self.global_dims,
                "token_dim": self.token_dim, "n_tokens": self.n_tokens}
        return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def blocks(self) -> list[nn.Module]:
        """The attention blocks that can take pre-attention adapters (vision transformers only)."""
        raise ValueError(f"{self.name} is not a vision transformer: it has no attention blocks for adapters")

    def set_pre_attention_adapter(self, index: int, module: nn.Module | None) -> None:
        """Insert an adapter before block `index`'s attention (vision transformers only; see vit.py)."""
        raise ValueError(f"{self.name} is not a vision transformer: pre-attention adapters need CLIP or SigLIP")

    def extra_repr(self) -> str:
        """The encoder's name and sizes, shown by print(model)."""
        return (f"name={self.name!r}, global_dims={self.global_dims}, token_dim={self.token_dim}, "
                f"n_tokens={self.n_tokens}, image_size={self.image_size}")
