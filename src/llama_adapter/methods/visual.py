"""The frozen image encoder behind every multimodal method, with its feature cache.

Turns a batch's images (paths, bytes, PIL images, or None for "no image") into features
for the whole batch, standardised per channel (vision/standardize.py): rows without an
image are zeros and flagged in `has_image`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batch import PreparedBatch
from ..model.load import cache_dir
from ..vision import FeatureCache, FeatureStandardizer, VisionFeatures, load_encoder


class VisualFrontend(nn.Module):
    def __init__(self, spec: str, use_cache: bool = True):
        super().__init__()
        self.spec = spec
        self.encoder = load_encoder(spec).freeze()
        self.standardizer = FeatureStandardizer(self.encoder.global_dims, self.encoder.token_dim)
        self.use_cache = use_cache
        self._cache: FeatureCache | None = None

    def state_buffer_names(self, prefix: str) -> list[str]:
        """The running statistics, which belong in the adapter checkpoint."""
        return [f"{prefix}standardizer.{n}" for n, _ in self.standardizer.named_buffers()]

    def _encode(self, images: list[Any]) -> VisionFeatures:
        cacheable = self.use_cache and not self.encoder.has_trainable() and all(
            isinstance(im, (str, os.PathLike, bytes)) for im in images)
        if cacheable:
            if self._cache is None:
                self._cache = FeatureCache(cache_dir() / "features", self.encoder)
            return self._cache.get([str(im) if isinstance(im, Path) else im for im in images])
        if self.encoder.has_trainable():
            return self.encoder.encode(images)
        with torch.no_grad():
            return self.encoder.encode(images)

    def features(self, images: Sequence[Any] | None, batch_size: int,
                 device: torch.device) -> tuple[VisionFeatures | None, torch.Tensor]:
        """(features [B, ...] with zero rows where there is no image, or None if none has one; has_image [B])."""
        images = list(images) if images is not None else [None] * batch_size
        if len(images) != batch_size:
            raise ValueError(f"{len(images)} images for a batch of {batch_size} prompts (use None for no image)")
        present = [i for i, im in enumerate(images) if im is not None]
        has = torch.zeros(batch_size, dtype=torch.bool, device=device)
        if not present:
            self.standardizer.observe_no_images()
            return None, has
        has[present] = True
        feats = self._encode([images[i] for i in present]).to(device=device, dtype=torch.float32)
        feats = self.standardizer(feats)
        if len(present) == batch_size:
            return feats, has
        index = torch.tensor(present, device=device)

        def scatter(t: torch.Tensor) -> torch.Tensor:
            full = t.new_zeros((batch_size, *t.shape[1:]))
            return full.index_copy(0, index, t)

        return VisionFeatures([scatter(g) for g in feats.globals], scatter(feats.tokens)), has


def install_visual(model, frontend: VisualFrontend, proj: nn.Module) -> tuple[list[str], list[str]]:
    """Place a frontend and its projector at `model.visual`; (the projector's parameter names, the
    frontend's state buffer names), as the method's `Attached` lists them."""
    model.visual = nn.ModuleDict({"frontend": frontend, "proj": proj})
    return [f"visual.proj.{n}" for n, _ in proj.named_parameters()], frontend.state_buffer_names("visual.frontend.")


def visual_preparers(extras: Callable[[Sequence[Any] | None, int], dict[str, Any]]):
    """The (prepare_inputs, prepare_batch) pair of a method whose visual inputs only add context
    entries (`extras(images, batch_size)`), for generation and for training batches alike."""

    def prepare_inputs(model, ids: torch.Tensor, mask: torch.Tensor, images) -> PreparedBatch:
        return PreparedBatch(ids, None, mask, extras(images, ids.shape[0]))

    def prepare_batch(model, batch):
        ids = batch.input_ids
        return {"input_ids": ids, "extras": extras(getattr(batch, "images", None), ids.shape[0])}, batch.labels

    return prepare_inputs, prepare_batch
