"""Caption experts: any callable, or one of our own caption-trained adapters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class CallableExpert:
    """An expert from any function image -> caption; the text gets `prefix` unless it is empty."""
    def __init__(self, fn: Callable[[Any], str], name: str = "caption", prefix: str = "Image caption: "):
        self.fn, self.name, self.prefix = fn, name, prefix

    def describe(self, image: Any) -> str:
        """The prefixed caption of `image`; "" when the function returns nothing."""
        text = self.fn(image).strip()
        return self.prefix + text if text else ""


class AdapterCaptionExpert(CallableExpert):
    """Loads a multimodal adapter checkpoint (its base model named in it) and asks it for a caption,
    laid out as the caption training data was (the plain template, the caption instruction)."""

    def __init__(self, folder: Path, instruction: str = "Describe the image briefly.", template: str = "plain",
                 max_new_tokens: int = 32):
        from ..data.multimodal import prompt_ids
        from ..generate import Sampling, complete_ids
        from ..methods.io import load_adapted

        model, tok = load_adapted(folder)  # on the base model named in the checkpoint
        ids = prompt_ids(tok, instruction, template, "", True)

        def caption(image: Any) -> str:
            return complete_ids(model, tok, [ids], Sampling(max_new_tokens=max_new_tokens), [image])[0]

        super().__init__(caption, name=f"caption:{folder}")
