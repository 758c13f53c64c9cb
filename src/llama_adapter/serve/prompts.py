"""Chat messages -> prompt token ids, laid out as the adapter was trained (or by the model's chat template)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.multimodal import prompt_ids
from ..data.templates import alpaca_prompt
from ..model.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptLayout:
    """How prompts are laid out: `template` None is the model's own chat template; "alpaca", "chat" or
    "plain" are the training templates of data/ (with the image placeholder a llava recipe used)."""

    template: str | None = None
    image_placeholder: str = ""


def training_layout(adapter: str | Path) -> PromptLayout:
    """The layout of the recipe an adapter was trained with (recipe.yaml in its run folder), if it names one."""
    path = Path(adapter).expanduser()
    recipe = (path if path.is_dir() else path.parent) / "recipe.yaml"
    if not recipe.is_file():
        return PromptLayout()
    data = (yaml.safe_load(recipe.read_text()) or {}).get("data") or []
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    fmt = first.get("format", "alpaca")
    template = first.get("template") or ("alpaca" if fmt == "alpaca" else "chat")
    return PromptLayout(str(template), str(first.get("image_placeholder") or ""))


def render_chat(tok: Tokenizer, layout: PromptLayout, messages: list[tuple[str, str]], expert_text: str = "",
                has_image: bool = False) -> list[int]:
    """(role, text) messages, the last from the user -> the ids to generate the reply from.

    System messages lead the first user turn in the training templates; "alpaca" is single-turn (the last
    user message, with the experts' text in its input slot). Experts' text joins the last user message."""
    system = "\n\n".join(t for r, t in messages if r == "system")
    turns = [(r, t) for r, t in messages if r != "system"]
    last = turns[-1][1]
    template = layout.template
    if template is None and not tok.has_chat_template:
        template = "alpaca"
    if template == "alpaca":
        instruction = f"{system}\n\n{last}" if system else last
        return tok.encode(alpaca_prompt(instruction, expert_text), add_special_tokens=True)
    if expert_text:
        last = f"{last}\n\n{expert_text}"
    if template is None:
        chat = [{"role": r, "content": t} for r, t in messages[:-1]] + [{"role": "user", "content": last}]
        return tok.encode(tok.chat_prompt(chat), add_special_tokens=False)
    history: list[tuple[str, str]] = []
    pending: str | None = None
    for role, text in turns[:-1]:
        if role == "user":
            pending = text if pending is None else f"{pending}\n\n{text}"
        elif pending is not None:
            history.append((pending, text))
            pending = None
    question = last if pending is None else f"{pending}\n\n{last}"
    if system:
        history = [(f"{system}\n\n{history[0][0]}", history[0][1]), *history[1:]] if history else history
        question = question if history else f"{system}\n\n{question}"
    return prompt_ids(tok, question, template, layout.image_placeholder, has_image, history)
