"""Images in, visual tokens out: image loading, frozen encoders, a feature cache and projectors."""

from .cache import FeatureCache
from .encoders import (
    DEFAULT_ENCODER,
    EFFICIENTNET_TAP_BLOCKS,
    CLIPEncoder,
    EfficientNetLite0Encoder,
    ImageEncoder,
    SiglipEncoder,
    VisionFeatures,
    default_vit_layers,
    load_encoder,
    projected_clip_spec,
)
from .images import ImageSource, blank_image, image_digest, load_image, to_rgb
from .projectors import (
    GlobalMLPProjector,
    LavinNeck,
    QueryBlock,
    ReleaseQueryProjector,
    VisualQueryProjector,
    grid_position_embedding,
)
from .standardize import FeatureStandardizer

__all__ = [
    "DEFAULT_ENCODER",
    "EFFICIENTNET_TAP_BLOCKS",
    "CLIPEncoder",
    "EfficientNetLite0Encoder",
    "FeatureCache",
    "FeatureStandardizer",
    "GlobalMLPProjector",
    "ImageEncoder",
    "ImageSource",
    "LavinNeck",
    "QueryBlock",
    "ReleaseQueryProjector",
    "SiglipEncoder",
    "VisionFeatures",
    "VisualQueryProjector",
    "grid_position_embedding",
    "blank_image",
    "default_vit_layers",
    "image_digest",
    "load_encoder",
    "projected_clip_spec",
    "load_image",
    "to_rgb",
]
