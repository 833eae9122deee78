"""Zero-shot multiple-choice accuracy (WMDP, MMLU), in this project's prompt or
lm-evaluation-harness's."""
from __future__ import annotations

import numpy as np

from alter.data import MCQ_LETTERS, encode_completion, format_mcq
from alter.evaluation.scoring import completion_nll, context_length, last_token_logprobs
from alter.evaluation.validation import check_columns


def mcq_accuracy(model, tokenizer, dataset, batch_size: int = 16, lm_eval: bool = False,
                 subject: str | None = None) -> float:
    """Zero-shot multiple-choice accuracy (WMDP / MMLU): the predicted choice is the letter
    (``" A"``, ``" B"``, ...) with the highest log-likelihood after :func:`format_mcq`.

    ``dataset``: columns ``question``, ``choices`` (list of strings), ``answer`` (int index).
    ``lm_eval=True``: lm-evaluation-harness's prompt, headed ``"The following are multiple
    choice questions (with answers) about {subject}.\n\n"``, ``subject`` being the argument
    (WMDP's tasks use ``"biology"``, ``"cybersecurity"``, ``"chemistry"``) or else each row's
    ``subject`` column (MMLU). When every letter is one token after the prompt (the usual
    case), one forward pass per question scores them all; otherwise each letter's
    continuation is scored in full.
    """
    fn = "mcq_accuracy"
    check_columns(fn, dataset, ("question", "choices", "answer"))
    if subject is not None and not lm_eval:
        raise ValueError(f"{fn}: subject is used by the lm_eval prompt only; pass lm_eval=True")
    if lm_eval and subject is None and "subject" not in dataset.column_names:
        raise ValueError(f"{fn}: the lm_eval prompt needs a subject: pass subject= or a 'subject' column")
    context = context_length(model)
    prompt_ids, encoded, num_choices, answers = [], [], [], []
    for i, row in enumerate(dataset):
        choices, answer = list(row["choices"]), row["answer"]
        if not 2 <= len(choices) <= len(MCQ_LETTERS):
            raise ValueError(f"{fn}: row {i} has {len(choices)} choices; need 2 to {len(MCQ_LETTERS)}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{fn}: row {i} has answer {answer!r}; need an int index into its {len(choices)} choices")
        prompt = format_mcq(row["question"], choices, (subject or row["subject"]) if lm_eval else None)
        prompt_ids.append(tokenizer(prompt)["input_ids"])
        encoded.append([encode_completion(tokenizer, prompt, f" {letter}", context, add_eos=False)
                        for letter in MCQ_LETTERS[:len(choices)]])
        num_choices.append(len(choices))
        answers.append(answer)
    if any(len({tuple(e["input_ids"]) for e in row}) < len(row) for row in encoded):
        raise ValueError(f"{fn}: the tokenizer cannot tell the answer letters apart (unknown tokens?)")
    single_token = all(e["input_ids"][:-1] == ids for ids, row in zip(prompt_ids, encoded) for e in row)
    if single_token and len(set(num_choices)) == 1:
        letter_ids = np.array([[e["input_ids"][-1] for e in row] for row in encoded])
        scores = last_token_logprobs(model, tokenizer, prompt_ids, letter_ids, batch_size, fn)
    else:
        nll_sum, _ = completion_nll(model, tokenizer, [e for row in encoded for e in row], batch_size, fn)
        scores = [-s for s in np.split(nll_sum, np.cumsum(num_choices)[:-1])]
    predictions = np.array([int(np.argmax(s)) for s in scores])
    return float((predictions == np.array(answers)).mean())
