"""Expert models that turn images into text for the instruction's context."""

from .base import Expert, expert_prompt_ids, load_expert, with_context
from .caption import AdapterCaptionExpert, CallableExpert
from .precomputed import PrecomputedExpert

__all__ = ["AdapterCaptionExpert", "CallableExpert", "Expert", "PrecomputedExpert", "expert_prompt_ids",
           "load_expert", "with_context"]
