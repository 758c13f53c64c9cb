"""`load_encoder`: build a frozen image encoder from a spec string (the encoder classes live beside it).

Every encoder returns `VisionFeatures` (features.py); CLIP and SigLIP load from a local
transformers folder (vit.py); the default is the embedded ImageNet EfficientNet-Lite0
(efficientnet.py), the only real image model available offline. The names re-exported here
keep `llama_adapter.vision.encoders` importable as before the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .efficientnet import (
    EFFICIENTNET_GRID,
    EFFICIENTNET_MEAN,
    EFFICIENTNET_STD,
    EFFICIENTNET_TAP_BLOCKS,
    EfficientNetLite0Encoder,
)
from .features import ImageEncoder, VisionFeatures
from .vit import VIT_SHAPES, CLIPEncoder, SiglipEncoder, _check_folder, _vit_family, default_vit_layers

__all__ = [
    "DEFAULT_ENCODER",
    "EFFICIENTNET_GRID",
    "EFFICIENTNET_MEAN",
    "EFFICIENTNET_STD",
    "EFFICIENTNET_TAP_BLOCKS",
    "VIT_SHAPES",
    "CLIPEncoder",
    "EfficientNetLite0Encoder",
    "ImageEncoder",
    "SiglipEncoder",
    "VisionFeatures",
    "default_vit_layers",
    "load_encoder",
    "projected_clip_spec",
]

DEFAULT_ENCODER = "efficientnet-lite0"
PROJECTED_CLIP = "clip-projected"  # spec prefix: CLIP with tokens="projected"


def load_encoder(spec: str = DEFAULT_ENCODER, layers: Sequence[int] | None = None) -> ImageEncoder:
    """Build an encoder from a spec: "efficientnet-lite0", "clip:<folder>", "clip-projected:<folder>" (all tokens
    through CLIP's visual projection: CLIPEncoder tokens="projected"), "siglip:<folder>", a folder, or
    "shape:<name>" (a random-init ViT of a published shape, for parameter counting: VIT_SHAPES).

    A bare folder is recognised as CLIP or SigLIP from its config.json `model_type`. `layers`
    (ViTs only) chooses the tapped layers; default every fourth from the last.
    """
    spec = str(spec)
    if spec == "efficientnet-lite0":
        if layers is not None:
            raise ValueError("efficientnet-lite0 has fixed taps; `layers` applies to CLIP/SigLIP only")
        return EfficientNetLite0Encoder()
    kind, sep, rest = spec.partition(":")
    if sep and kind == "shape":
        if rest not in VIT_SHAPES:
            raise ValueError(f"unknown encoder shape {rest!r}; known: {', '.join(VIT_SHAPES)}")
        return (CLIPEncoder if VIT_SHAPES[rest][0] == "clip" else SiglipEncoder).from_shape(rest, layers)
    if sep and kind == PROJECTED_CLIP:
        if not rest:
            raise ValueError(f"encoder spec {spec!r} lacks a folder after '{kind}:'")
        return CLIPEncoder(rest, layers=layers, tokens="projected")
    if sep and kind in ("clip", "siglip"):
        if not rest:
            raise ValueError(f"encoder spec {spec!r} lacks a folder after '{kind}:'")
        cls = CLIPEncoder if kind == "clip" else SiglipEncoder
        return cls(rest, layers=layers)
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = _check_folder(path, "image encoder")
        return (CLIPEncoder if _vit_family(folder) == "clip" else SiglipEncoder)(folder, layers=layers)
    raise ValueError(f"unknown image encoder {spec!r}: expected 'efficientnet-lite0', 'clip:<folder>', "
                     f"'{PROJECTED_CLIP}:<folder>', 'siglip:<folder>' or an existing CLIP/SigLIP folder (no folder "
                     f"found at {path})")


def projected_clip_spec(spec: str) -> str:
    """The spec of the same CLIP folder with projected tokens ("clip-projected:<folder>"); a clear error for
    anything that is not a CLIP folder."""
    kind, sep, rest = str(spec).partition(":")
    if sep and kind == PROJECTED_CLIP:
        return str(spec)
    if sep and kind == "clip" and rest:
        return f"{PROJECTED_CLIP}:{rest}"
    path = Path(str(spec)).expanduser()
    if not sep and path.is_dir() and _vit_family(_check_folder(path, "image encoder")) == "clip":
        return f"{PROJECTED_CLIP}:{path}"
    raise ValueError(f"image encoder {spec!r}: projected tokens need a CLIP folder ('clip:<folder>')")
