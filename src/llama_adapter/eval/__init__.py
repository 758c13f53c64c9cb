"""Evaluation: visual question answering by question type (more to come: ScienceQA, captions)."""

from .vqa import VQAResult, evaluate_vqa

__all__ = ["VQAResult", "evaluate_vqa"]
