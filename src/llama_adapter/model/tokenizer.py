"""A thin wrapper over a Hugging Face fast tokenizer: encode, decode, chat template, EOS."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tokenizer:
    """A Hugging Face tokenizer plus the set of end-of-sequence ids and the padding id the model uses."""
    def __init__(self, hf: Any, extra_eos: tuple[int, ...] = ()):
        self.hf = hf
        eos = {hf.eos_token_id} if hf.eos_token_id is not None else set()
        self.eos_ids: set[int] = eos | set(extra_eos)
        if not self.eos_ids:
            raise ValueError("the tokenizer defines no end-of-sequence token")
        self.pad_id: int = hf.pad_token_id if hf.pad_token_id is not None else min(self.eos_ids)

    @classmethod
    def from_folder(cls, folder: str | Path, extra_eos: tuple[int, ...] = ()) -> Tokenizer:
        """The tokenizer saved in a Hugging Face folder."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder)), extra_eos)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer carries a chat template (the "chat" prompt template needs one)."""
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's special tokens (e.g. BOS) unless told not to."""
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, special tokens dropped unless told otherwise."""
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` as text (encode it with add_special_tokens=False)."""
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; use a plain prompt instead")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer files into `folder` (Hugging Face save_pretrained)."""
        self.hf.save_pretrained(str(folder))
