"""Data for unlearning: prompt formats (:mod:`~alter.data.formats`), encoding and batching
(:mod:`~alter.data.encoding`), benchmark loaders (:mod:`~alter.data.loaders`), the built-in
``tofu_mini`` set (:mod:`~alter.data.tofu_mini`) and the fictitious-knowledge scenarios of
``alter quality`` (:mod:`~alter.data.scenarios`, its invented words in
:mod:`~alter.data.facts`). The names below keep ``from alter.data import X`` working."""
import datasets  # noqa: F401  (tests patch alter.data.datasets.load_dataset)

from alter.data.encoding import (IGNORE_INDEX, collate, collated_batches, encode_completion, encode_qa, encode_text,
                                 pad_id_of)
from alter.data.formats import (MCQ_LETTERS, PROMPT_FORMATS, PromptFormat, format_mcq, format_qa, prompt_format_of,
                                qa_texts)
from alter.data.loaders import (DATA_DIR_ENV, hub_reachable, load_mmlu, load_muse, load_tofu, load_wmdp,
                                load_wmdp_corpus)
from alter.data.tofu_mini import tofu_mini

__all__ = ["IGNORE_INDEX", "collate", "collated_batches", "encode_completion", "encode_qa", "encode_text", "pad_id_of",
           "MCQ_LETTERS", "PROMPT_FORMATS", "PromptFormat", "format_mcq", "format_qa", "prompt_format_of", "qa_texts",
           "DATA_DIR_ENV", "load_mmlu", "load_muse", "load_tofu", "load_wmdp", "load_wmdp_corpus", "tofu_mini"]
