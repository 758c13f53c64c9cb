"""Prompt templates: the Alpaca prompt (with and without input) and the model's chat template."""

from __future__ import annotations

from ..model.tokenizer import Tokenizer

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt text, with the input section only when there is an input."""
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def render_prompt(template: str, tok: Tokenizer, instruction: str, input: str = "") -> tuple[str, bool]:
    """The prompt text and whether the tokenizer should add its special tokens to it."""
    if template == "alpaca":
        return alpaca_prompt(instruction, input), True
    if template == "chat":
        content = f"{instruction}\n\n{input}" if input.strip() else instruction
        return tok.chat_prompt([{"role": "user", "content": content}]), False
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
