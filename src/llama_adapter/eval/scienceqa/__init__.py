"""ScienceQA (Lu et al. 2022): loading, the development protocol, the papers' prompt format, answer parsing,
generated or ranked-choice answers, and accuracy overall and in ScienceQA's eight groups.

Data layouts (`load_scienceqa`):
- official: problems.json (dict pid -> problem), pid_splits.json next to it, images/<split>/<pid>/image.png;
- shared: problems.json whose problems carry their own "split", images/<pid>/image.png.

Development protocol (recipes/scienceqa_dev_protocol.md): the shared copy holds half of the official test
split as "dev" plus pids 1..1773 of train/val. Train on every train/val problem (text only when their images
are not available) plus the dev problems with int(pid) % 4 == 0; validate on the dev problems with
int(pid) % 4 == 2. The other half of the official test split is never tuned on.

Prompt (the layout of LLaMA-Adapter / LaVIN / MM-CoT): "Question: ...\\nContext: ...\\nOptions: (A) x (B) y\\n"
then an instruction line; the context is the hint ("N/A" when empty), with expert texts (captions, OCR)
appended. Target: "The answer is X." or, with fmt="explain", "The answer is X. BECAUSE: <lecture> <solution>".
With answer_form="choice" the answer names the choice's text instead of its letter ("The answer is blue."), with
an instruction line that asks for that.

An answer that cannot be parsed is wrong and counted as unparsed: there is never a random guess.
"""

from .loading import (
    LETTERS,
    MISSING_IMAGES,
    PROTOCOLS,
    SUBJECT_GROUPS,
    Problem,
    dev_protocol_train,
    dev_protocol_val,
    load_scienceqa,
    rotate_choices,
    shuffle_choices,
)
from .prompts import (
    ANSWER_FORMS,
    ANSWER_INSTRUCTION,
    CHOICE_INSTRUCTION,
    FORM_INSTRUCTION,
    FORMATS,
    answer_text,
    check_answer_form,
    choice_answer,
    expert_texts,
    options_text,
    question_text,
    scienceqa_conversations,
    scienceqa_to_llava,
    target_text,
)
from .runners import MODES, choice_logprobs, evaluate_scienceqa, sees_images, sequence_logprobs
from .scoring import GROUPS, ScienceQAResult, format_result, groups_of, parse_answer, score, write_predictions

__all__ = [
    "ANSWER_FORMS", "ANSWER_INSTRUCTION", "CHOICE_INSTRUCTION", "FORMATS", "FORM_INSTRUCTION", "GROUPS", "LETTERS",
    "MISSING_IMAGES", "MODES", "PROTOCOLS", "SUBJECT_GROUPS", "Problem", "ScienceQAResult", "answer_text",
    "check_answer_form", "choice_answer", "choice_logprobs", "dev_protocol_train", "dev_protocol_val",
    "evaluate_scienceqa", "expert_texts", "format_result", "groups_of", "load_scienceqa", "options_text",
    "parse_answer", "question_text", "rotate_choices", "scienceqa_conversations", "scienceqa_to_llava", "score",
    "sees_images", "sequence_logprobs", "shuffle_choices", "target_text", "write_predictions",
]
