"""CLIP and SigLIP vision towers from a local transformers folder, with layer taps and pre-attention adapters."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .features import ImageEncoder, VisionFeatures, _tensor_digest

if TYPE_CHECKING:  # transformers is imported lazily at run time (it is slow to import)
    from transformers import CLIPVisionModel, SiglipVisionModel

    VisionTower = CLIPVisionModel | SiglipVisionModel

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
    model: VisionTower
    processor: Any  # a transformers image processor (CLIPImageProcessor[Pil], SiglipImageProcessor[Pil])

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
        config_cls = model_cls.config_class  # CLIPVisionConfig / SiglipVisionConfig
        assert config_cls is not None, f"{model_cls.__name__} names no config class"
        config = config_cls(**VIT_SHAPES[shape][1])
        size = config.image_size
        if cls.family == "clip":
            proc = proc_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        else:
            proc = proc_cls(size={"height": size, "width": size})
        # transformers types config_class as the base PreTrainedConfig; it is the model's own config class
        enc._setup(model_cls(config).eval(), proc,  # type: ignore[arg-type]
                   f"shape:{shape}", layers)
        enc.random_init = True
        return enc

    def forward(self, pixels: torch.Tensor) -> VisionFeatures:
        if self.random_init:  # a shape preset must never train or answer silently
            raise ValueError(f"{self.name} is a random-init encoder for counting parameters; give the real "
                             f"weights (clip:<folder>) to encode images")
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states  # [0] = embeddings, [i] = after layer i
        return VisionFeatures([self._pool(hidden[i]) for i in self.layers], self._final_tokens(out))

    def _setup(self, model: VisionTower, processor: Any, name: str, layers: Sequence[int] | None) -> None:
        self.model = model
        self.processor = processor
        cfg = self.model.config
        self.layers = _check_layers(layers, cfg.num_hidden_layers)
        self.name = name
        size, patch = cfg.image_size, cfg.patch_size
        if not isinstance(size, int) or not isinstance(patch, int):  # transformers also allows [h, w] pairs
            raise TypeError(f"{name}: expected square images (one int image_size and patch_size), "
                            f"got image_size={size!r}, patch_size={patch!r}")
        self.image_size = size
        self.n_tokens = (self.image_size // patch) ** 2
        self.token_dim = int(cfg.hidden_size)
        self.global_dims = [self.token_dim] * len(self.layers)
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        got = tuple(self.preprocess([Image.new("RGB", (7, 5))]).shape[-2:])
        if got != (self.image_size, self.image_size):
            raise ValueError(f"{name}: the image processor makes {got} pixels but the model expects "
                             f"{self.image_size}x{self.image_size}")
        self.freeze()

    def _classes(self) -> tuple[type[VisionTower], type[Any]]:
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

    def _final_tokens(self, out: Any) -> torch.Tensor:  # out: the tower's BaseModelOutputWithPooling
        raise NotImplementedError

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    def adapters(self) -> dict[int, nn.Module]:
        return {i: self.blocks[i].get_submodule("pre_attention_adapter") for i in sorted(self._hooks)}

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
        self._hooks[index] = block.get_submodule("layer_norm1").register_forward_hook(_AdapterHook(block))
        module.train(self.training)


class _AdapterHook:
    """Forward hook on a block's first layer norm that passes its output through the adapter."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.block.get_submodule("pre_attention_adapter")(output)


def _processor_class(pil_name: str, plain_name: str) -> type[Any]:
    import transformers

    cls = getattr(transformers, pil_name, None)  # the PIL backend, named explicitly in transformers >= 5
    return cls if cls is not None else getattr(transformers, plain_name)


class CLIPEncoder(_HFViTEncoder):
    """CLIP vision tower: globals = [CLS] after each tapped layer, tokens = final-normed patch tokens.

    `tokens="projected"`: the tokens are instead all final-normed tokens, [CLS] included, through CLIP's
    visual projection (what the LLaMA-Adapter V2 release feeds its visual blocks: 257 x 768 for
    ViT-L/14); the projection weight is read from the folder (saved from CLIPModel or
    CLIPVisionModelWithProjection) and kept frozen beside the tower.
    """

    family = "clip"
    has_cls = True
    token_kind = "patches"
    projection: nn.Linear  # only with tokens="projected" (absent otherwise: see _projection)

    def __init__(self, folder: str | Path, layers: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float32, tokens: str = "patches") -> None:
        if tokens not in CLIP_TOKEN_KINDS:
            raise ValueError(f"CLIP tokens must be one of {', '.join(CLIP_TOKEN_KINDS)}, got {tokens!r}")
        super().__init__(folder, layers, dtype)
        if tokens == "projected":
            weight = _visual_projection(Path(folder).expanduser())
            if weight.shape[1] != self.token_dim:
                raise ValueError(f"{folder}: visual_projection.weight has shape {tuple(weight.shape)}, but the tower "
                                 f"has width {self.token_dim}")
            self.projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
            with torch.no_grad():
                self.projection.weight.copy_(weight)
            self.projection.requires_grad_(False)
            self.token_kind, self.token_dim, self.n_tokens = tokens, int(weight.shape[0]), self.n_tokens + 1

    def _classes(self) -> tuple[type[VisionTower], type[Any]]:
        from transformers import CLIPVisionModel

        return CLIPVisionModel, _processor_class("CLIPImageProcessorPil", "CLIPImageProcessor")

    def _preprocess_config(self) -> dict:
        config = super()._preprocess_config()
        projection = self._projection()
        if projection is not None:  # the projection is not part of the tower's weights digest
            config["tokens"] = {"kind": self.token_kind, "projection": _tensor_digest({"w": projection.weight})}
        return config

    def _final_tokens(self, out: Any) -> torch.Tensor:  # out: the tower's BaseModelOutputWithPooling
        projection = self._projection()
        if projection is not None:
            return projection(self.model.post_layernorm(out.last_hidden_state))
        return self.model.post_layernorm(out.last_hidden_state[:, 1:])

    def _projection(self) -> nn.Linear | None:
        projection = self._modules.get("projection")
        return projection if isinstance(projection, nn.Linear) else None


CLIP_TOKEN_KINDS = ("patches", "projected")


def _visual_projection(folder: Path) -> torch.Tensor:
    """CLIP's `visual_projection.weight` [projection_dim, width] from a save_pretrained folder."""
    from safetensors import safe_open

    key = "visual_projection.weight"
    index = folder / "model.safetensors.index.json"
    files = ([folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
             if index.is_file() else [folder / "model.safetensors"])
    for file in files:
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                if key in f.keys():
                    return f.get_tensor(key)
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        if key in state:
            return state[key]
    raise ValueError(f"{folder} has no {key}: projected CLIP tokens need the visual projection (save the folder "
                     f"from CLIPModel or CLIPVisionModelWithProjection, not CLIPVisionModel)")


class SiglipEncoder(_HFViTEncoder):
    """SigLIP vision tower (no [CLS]): globals = mean patch token after each tapped layer."""

    family = "siglip"
    has_cls = False

    def _classes(self) -> tuple[type[VisionTower], type[Any]]:
        from transformers import SiglipVisionModel

        return SiglipVisionModel, _processor_class("SiglipImageProcessorPil", "SiglipImageProcessor")

    def _final_tokens(self, out: Any) -> torch.Tensor:  # out: the tower's BaseModelOutputWithPooling
        return out.last_hidden_state  # already after post_layernorm


def _vit_family(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    model_type = str(cfg.get("model_type", ""))
    if model_type in ("clip", "clip_vision_model"):
        return "clip"
    if model_type in ("siglip", "siglip_vision_model"):
        return "siglip"
    raise ValueError(f"{folder}/config.json has model_type {model_type!r}; expected a CLIP or SigLIP model "
                     f"(clip, clip_vision_model, siglip, siglip_vision_model)")
