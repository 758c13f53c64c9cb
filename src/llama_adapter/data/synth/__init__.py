"""A synthetic visual instruction data set: coloured shapes and rendered words, with checkable answers.

Small CPU runs need images whose answers are unambiguous, learnable in minutes and checkable against the
pixels, so evaluation numbers mean something. Everything is drawn without anti-aliasing from seeded
generators and written without timestamps: the same seed gives byte-identical files (with the same Pillow
build, which brings its own FreeType for the text and zlib for the PNGs).

Answer formats (the `answer` field; the assistant turn is `reply_text(answer)`):
  colour, colour_of: a colour word ("red"); shape: a kind word ("circle"); count: a digit ("3");
  position, yes_no: "yes" or "no"; side: "left" or "right"; ocr: the word, lower case ("apple").
Compare a generated reply with `normalise_answer(reply) == answer`.
"""

from .drawing import COLOURS, GAP, KINDS, SIZE_RANGE, WORDS, Shape, draw_shapes, draw_word, place_shapes
from .questions import (
    ANSWER_FORMATS,
    CAPTION_FORMAT,
    NUMBER_WORDS,
    OCR_QUESTION,
    QA,
    QTYPES,
    QUESTIONS,
    SQA_CATEGORY,
    describe,
    make_questions,
    normalise_answer,
    reply_text,
    sqa_problem,
    with_article,
)
from .writer import OUTPUTS, SynthSummary, png_bytes, summary_dict, synthesize

__all__ = [
    "ANSWER_FORMATS", "CAPTION_FORMAT", "COLOURS", "GAP", "KINDS", "NUMBER_WORDS", "OCR_QUESTION", "OUTPUTS", "QA",
    "QTYPES", "QUESTIONS", "SIZE_RANGE", "SQA_CATEGORY", "WORDS", "Shape", "SynthSummary", "describe", "draw_shapes",
    "draw_word", "make_questions", "normalise_answer", "place_shapes", "png_bytes", "reply_text", "sqa_problem",
    "summary_dict", "synthesize", "with_article",
]
