"""Evaluation: visual question answering by question type, ScienceQA, caption metrics (BLEU-4, CIDEr-D), and
paired comparisons of two evaluations (McNemar's exact test)."""

from .captions import bleu, bleu4, cider_d, cider_d_scores
from .paired import PairedComparison, compare_paired, compare_prediction_files
from .scienceqa import (
    Problem,
    ScienceQAResult,
    dev_protocol_train,
    dev_protocol_val,
    evaluate_scienceqa,
    load_scienceqa,
    parse_answer,
    rotate_choices,
    scienceqa_conversations,
    scienceqa_to_llava,
    shuffle_choices,
    write_predictions,
)
from .vqa import VQAResult, evaluate_vqa

__all__ = ["PairedComparison", "Problem", "ScienceQAResult", "VQAResult", "bleu", "bleu4", "cider_d", "cider_d_scores",
           "compare_paired", "compare_prediction_files", "dev_protocol_train", "dev_protocol_val",
           "evaluate_scienceqa", "evaluate_vqa", "load_scienceqa", "parse_answer", "rotate_choices",
           "scienceqa_conversations", "scienceqa_to_llava", "shuffle_choices", "write_predictions"]
