"""Shared fixtures: tiny random-weight models and a tiny tokenizer, built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The default compiled decode step would compile graphs in the background for every tiny model of the run;
# tests/test_fastpath.py turns it on where it is the subject.
os.environ.setdefault("LLAMA_ADAPTER_FAST_DECODE", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a red circle and a blue square are on the left",
    "what colour is the triangle? the triangle is green.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: The answer is A B C D E",
    "hello world, how are you today? I am fine, thank you.",
    "0 1 2 3 4 5 6 7 8 9 yes no one two three four",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE tokenizer (about 400 tokens) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="session")
def hf_tokenizer():
    return make_tokenizer()


def tiny_hf_config(kind: str = "llama", vocab_size: int = 400, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    return cls(**base)


def tiny_hf_model(kind: str = "llama", seed: int = 0, **overrides):
    """A transformers model with random weights; norms and biases randomised too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(kind, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny_folder(path: Path, kind: str = "llama", seed: int = 0, **overrides) -> Path:
    hf = tiny_hf_model(kind, seed, **overrides)
    hf.save_pretrained(str(path))
    make_tokenizer().save_pretrained(str(path))
    return path


def expected_table_kind(kind: str, vocab: int) -> str:
    """The embedding/head table a base packed as `kind` gets for `vocab` rows of the tiny models' width here: int4
    only where this CPU's int4 packing can be read back by row (model/quantize.py), else int8."""
    from llama_adapter.model.quantize import QuantizedWeight

    readable = QuantizedWeight.from_weight(torch.randn(vocab, 64), "int4", rows=True).has_rows
    return "int4" if kind == "int4" and readable else "int8"


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return save_tiny_folder(tmp_path / "tiny")


@pytest.fixture
def tiny(tiny_folder):
    import llama_adapter as la

    return la.load_pretrained(tiny_folder)
