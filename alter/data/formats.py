"""How questions are put to a model: the QA prompt, the multiple-choice prompt and other
harnesses' prompt formats (:class:`PromptFormat`). Training and evaluation share them, so a
question is always prompted the same way."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import datasets

from alter.config import check_choice


def format_qa(question: str, answer: str | None = None) -> str:
    """The prompt of a question, ``"Question: {question}\\nAnswer:"``, followed by
    ``" {answer}"`` when an answer is given. Training and evaluation both use it."""
    prompt = f"Question: {question}\nAnswer:"
    return prompt if answer is None else f"{prompt} {answer}"


PROMPT_FORMATS = ("plain", "llama2-inst", "chat")


@dataclass(frozen=True)
class PromptFormat:
    """How a question is put to a model, for evaluation against other harnesses.

    * ``"plain"``: :func:`format_qa`, the project's own (training uses it);
    * ``"llama2-inst"``: ``"[INST] {question} [/INST]"`` followed directly by the answer, as
      TOFU's Llama-2 configuration (``question_start_tag "[INST] "``, ``question_end_tag
      " [/INST]"``, ``answer_tag ""``) and open-unlearning's ``Llama-2-7b-chat-hf`` template;
    * ``"chat"``: the tokenizer's chat template (``apply_chat_template``) with one user turn,
      after a system turn when ``system_prompt`` is set, as open-unlearning does for models
      with ``apply_chat_template: True``. ``template_kwargs`` go to the template (e.g.
      ``{"date_string": "10 Apr 2025"}``, open-unlearning's for Llama-3).
    """

    style: str = "plain"
    system_prompt: str | None = None
    template_kwargs: tuple = ()  # (name, value) pairs: the dataclass stays hashable

    def __post_init__(self):
        check_choice("style", self.style, PROMPT_FORMATS, "PromptFormat")
        if self.style != "chat" and (self.system_prompt is not None or self.template_kwargs):
            raise ValueError(f"PromptFormat: system_prompt and template_kwargs apply to the 'chat' style, "
                             f"not {self.style!r}")

    @property
    def add_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (BOS): a chat template writes its own."""
        return self.style != "chat"

    def _chat(self, tokenizer, messages, generation_prompt: bool) -> str:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("PromptFormat('chat'): the tokenizer has no chat template; "
                             "use the 'plain' or 'llama2-inst' format")
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return tokenizer.apply_chat_template(system + messages, tokenize=False,
                                             add_generation_prompt=generation_prompt,
                                             **dict(self.template_kwargs))

    def prompt(self, tokenizer, question: str) -> str:
        """The text put to the model before its answer."""
        if self.style == "plain":
            return format_qa(question)
        if self.style == "llama2-inst":
            return f"[INST] {question} [/INST]"
        return self._chat(tokenizer, [{"role": "user", "content": question}], True)

    def completion(self, tokenizer, question: str, answer: str) -> str:
        """The text that follows :meth:`prompt` when the model gives ``answer`` (for the chat
        style, the answer and the template's end-of-turn marks)."""
        prompt = self.prompt(tokenizer, question)
        if self.style == "plain":
            full = format_qa(question, answer)
        elif self.style == "llama2-inst":
            full = prompt + answer
        else:
            full = self._chat(tokenizer, [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], False)
        if not full.startswith(prompt):
            raise ValueError("PromptFormat('chat'): the chat template renders a conversation that does not "
                             "start with its own generation prompt; it cannot be scored answer by answer")
        return full[len(prompt):]


def prompt_format_of(spec: str | PromptFormat | None) -> PromptFormat:
    """A :class:`PromptFormat` from itself, a style name, or None (``"plain"``)."""
    if spec is None:
        return PromptFormat()
    if isinstance(spec, PromptFormat):
        return spec
    if isinstance(spec, str):
        return PromptFormat(spec)
    raise TypeError(f"prompt_format must be a style in {PROMPT_FORMATS} or a PromptFormat, got {spec!r}")


MCQ_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_mcq(question: str, choices: Sequence[str], subject: str | None = None) -> str:
    """The zero-shot multiple-choice prompt (WMDP, MMLU)
    ``"{question}\\nA. {choice 0}\\nB. {choice 1}\\nC. …\\nD. …\\nAnswer:"``; the answer is
    scored as the continuation ``" A"``, ``" B"``, ...

    With a ``subject``, the prompt of lm-evaluation-harness's MMLU and WMDP tasks: the header
    ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``
    (underscores of the subject read as spaces, as MMLU's subject names are written) and the
    question stripped of outer whitespace."""
    header = ""
    if subject is not None:
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        question = question.strip()
    lines = [question] + [f"{letter}. {choice}" for letter, choice in zip(MCQ_LETTERS, choices)]
    return header + "\n".join(lines) + "\nAnswer:"


def qa_texts(data: datasets.Dataset | datasets.DatasetDict) -> list[str]:
    """Every prompt-plus-answer text of a QA dataset (answer, paraphrase and perturbed
    answers alike), formatted by :func:`format_qa`: the corpus to build a closed
    vocabulary from (:func:`alter.tiny.build_tokenizer`)."""
    parts = data.values() if isinstance(data, datasets.DatasetDict) else [data]
    texts = []
    for part in parts:
        for row in part:
            answers = [row["answer"]]
            answers += [row["paraphrased_answer"]] if "paraphrased_answer" in row else []
            answers += list(row.get("perturbed_answer") or [])
            texts += [format_qa(row["question"], a) for a in answers]
    return texts
