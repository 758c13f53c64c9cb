"""llama-adapter: LLaMA-Adapter V1/V2 and LaVIN on a frozen LLaMA-family model.

The public API (docs/ and the README describe it): load a model, attach a method, train it with
the one trainer, save or load the adapter (ours, the papers' releases, PEFT), generate, export a
folded model, encode images, run experts and evaluate on ScienceQA.
"""

from .batch import Batch, Example
from .eval import ScienceQAResult, evaluate_scienceqa, evaluate_vqa, load_scienceqa
from .experts import Expert, load_expert
from .generate import Sampling, generate, stream
from .interop import convert, detect_format, load_adapter, save_adapter
from .loss import lm_loss
from .methods import (
    AdapterV1Config,
    AdapterV2Config,
    LavinConfig,
    attach,
    count_trainable,
    fold,
    trainable_parameters,
)
from .methods.export import export_folded
from .methods.io import load_adapted
from .model import KVCache, LlamaLM, ModelConfig, Tokenizer, build_model, load_pretrained
from .model.attached import AttachedMethod, TrainableAdapter
from .model.fastpath import disable_compiled_decode, enable_compiled_decode
from .recipe import Recipe, load_recipe
from .runner import run_recipe
from .train import TrainConfig, Trainer, TrainResult
from .vision import ImageEncoder, VisionFeatures, load_encoder

__version__ = "0.1.0"
__all__ = [
    "AdapterV1Config", "AdapterV2Config", "AttachedMethod", "Batch", "Example", "Expert", "ImageEncoder", "KVCache",
    "LavinConfig", "LlamaLM", "ModelConfig", "Recipe", "Sampling", "ScienceQAResult", "Tokenizer", "TrainConfig",
    "TrainResult", "TrainableAdapter", "Trainer", "VisionFeatures", "attach", "build_model", "convert",
    "count_trainable", "detect_format", "disable_compiled_decode", "enable_compiled_decode", "evaluate_scienceqa",
    "evaluate_vqa", "export_folded", "fold", "generate", "lm_loss", "load_adapted", "load_adapter", "load_encoder",
    "load_expert", "load_pretrained", "load_recipe", "load_scienceqa", "run_recipe", "save_adapter", "stream",
    "trainable_parameters",
]
