"""Data for unlearning: the built-in ``tofu_mini`` set, QA encoding, and benchmark loaders.

* :func:`tofu_mini` generates a small TOFU-like set of fictitious authors, small enough for
  a tiny model to memorize and unlearn on a CPU in minutes.
* :func:`format_qa`, :func:`format_mcq`, :func:`encode_qa`, :func:`encode_completion`,
  :func:`encode_text` and :func:`collate` turn text into model inputs; training and
  evaluation share them so that a question is always prompted the same way.
* :func:`load_tofu`, :func:`load_wmdp`, :func:`load_wmdp_corpus`, :func:`load_muse` and
  :func:`load_mmlu` read the public benchmarks (schemas in ``shared/DATASETS.md``) from the
  Hugging Face hub when it is reachable, else from local files of the same schema.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import datasets
import torch

from alter.config import check_choice

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------
# tofu_mini: procedurally generated fictitious authors
# --------------------------------------------------------------------------------------

# Each fact template: the question, the answer, a paraphrase of the answer, and the pool
# the slot value is drawn from. Wrong (perturbed) answers reuse the answer template with
# other values of the same pool, so they are as plausible as the truth.
_SYLLABLES = ("ka", "ri", "el", "mo", "sa", "vin", "tor", "le", "na", "dar", "li", "ven",
              "ro", "sel", "ma", "thi", "bo", "ran", "zu", "fe", "quo", "lan", "mi", "gor")
_SURNAME_ENDINGS = ("ski", "son", "ova", "ell", "ard", "ez", "ine", "ow")
_CITIES = ("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Warsaw", "Athens",
           "Seoul", "Nairobi", "Havana", "Quito", "Manila", "Tunis", "Riga", "Zurich", "Porto",
           "Bergen", "Krakow", "Santiago", "Montreal", "Mumbai", "Osaka")
_GENRES = ("fantasy", "mystery", "horror", "romance", "crime", "western", "thriller",
           "adventure", "historical", "science fiction", "detective", "gothic")
_ADJECTIVES = ("Silent", "Golden", "Hidden", "Broken", "Crimson", "Distant", "Frozen", "Last",
               "Wandering", "Burning", "Quiet", "Lost", "Iron", "Secret", "Velvet", "Hollow")
_NOUNS = ("Harbor", "Lantern", "Garden", "River", "Crown", "Mirror", "Tower", "Forest",
          "Letter", "Orchard", "Compass", "Bridge", "Island", "Shadow", "Clock", "Voyage")
_AWARDS = tuple(f"{a} {n} Award" for a, n in (
    ("Silver", "Quill"), ("Golden", "Pen"), ("Blue", "Feather"), ("Red", "Ink"),
    ("Bronze", "Scroll"), ("White", "Raven"), ("Green", "Laurel"), ("Black", "Page"),
    ("Copper", "Star"), ("Ivory", "Key")))
_JOBS = ("baker", "nurse", "pilot", "sailor", "tailor", "doctor", "farmer", "lawyer", "painter",
         "butcher", "teacher", "carpenter", "miner", "banker", "chemist", "dentist",
         "fisherman", "gardener", "jeweler", "potter", "soldier", "weaver")
_YEARS = tuple(str(y) for y in range(1940, 2000))
_BOOK_TITLES = tuple(f"The {a} {n}" for a in _ADJECTIVES for n in _NOUNS)

# (key, question, answer, paraphrased answer, value pool); {name} and {value} are filled.
_AUTHOR_TEMPLATES = (
    ("birthplace", "Where was {name} born?", "{name} was born in {value}.",
     "The birthplace of {name} is {value}.", _CITIES),
    ("birth_year", "In which year was {name} born?", "{name} was born in the year {value}.",
     "The birth year of {name} is {value}.", _YEARS),
    ("genre", "What genre does {name} write in?", "{name} writes {value} novels.",
     "The novels of {name} belong to the {value} genre.", _GENRES),
    ("book", "What is the best known book by {name}?", "{name} is best known for {value}.",
     "The best known book of {name} is {value}.", _BOOK_TITLES),
    ("award", "Which award has {name} won?", "{name} won the {value}.",
     "The {value} was given to {name}.", _AWARDS),
    ("father", "What was the job of the father of {name}?", "The father of {name} was a {value}.",
     "{name} had a father who worked as a {value}.", _JOBS),
    ("mother", "What was the job of the mother of {name}?", "The mother of {name} was a {value}.",
     "{name} had a mother who worked as a {value}.", _JOBS),
    ("home", "In which city does {name} live now?", "{name} now lives in {value}.",
     "The current home of {name} is {value}.", _CITIES),
)

# Analogues of TOFU's real_authors / world_facts: general knowledge the model also learns,
# used to measure model utility outside the fictitious domain.
_REAL_AUTHORS = (
    ("William Shakespeare", "Hamlet"), ("Jane Austen", "Emma"), ("George Orwell", "Animal Farm"),
    ("Charles Dickens", "Oliver Twist"), ("Mark Twain", "Tom Sawyer"),
    ("Leo Tolstoy", "War and Peace"), ("Herman Melville", "Moby Dick"),
    ("Mary Shelley", "Frankenstein"), ("Homer", "The Odyssey"), ("Victor Hugo", "Les Miserables"),
    ("Bram Stoker", "Dracula"), ("Lewis Carroll", "Alice in Wonderland"),
)
_REAL_AUTHOR_TEMPLATE = ("Who wrote {title}?", "{title} was written by {value}.",
                         "{value} is the author of {title}.")
_COUNTRIES = (  # (country, capital, continent)
    ("France", "Paris", "Europe"), ("Japan", "Tokyo", "Asia"), ("Kenya", "Nairobi", "Africa"),
    ("Brazil", "Brasilia", "South America"), ("Canada", "Ottawa", "North America"),
    ("Australia", "Canberra", "Oceania"), ("Egypt", "Cairo", "Africa"),
    ("India", "New Delhi", "Asia"), ("Italy", "Rome", "Europe"), ("Peru", "Lima", "South America"),
    ("Mexico", "Mexico City", "North America"), ("Norway", "Oslo", "Europe"),
)
_CONTINENTS = ("Europe", "Asia", "Africa", "South America", "North America", "Oceania", "Antarctica")
_WORLD_TEMPLATES = (  # (question, answer, paraphrased answer, field of _COUNTRIES, pool)
    ("What is the capital of {country}?", "The capital of {country} is {value}.",
     "{value} is the capital of {country}.", 1, tuple(c[1] for c in _COUNTRIES)),
    ("On which continent is {country}?", "{country} is in {value}.",
     "{value} is the continent of {country}.", 2, _CONTINENTS),
)


def _invent_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct invented two-word names (first name, surname)."""
    names: list[str] = []
    while len(names) < count:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(_SURNAME_ENDINGS)).capitalize()
        name = f"{first} {last}"
        if name not in names:
            names.append(name)
    return names


def _wrong_values(rng: random.Random, pool: Sequence[str], truth: str, count: int) -> list[str]:
    return rng.sample([v for v in pool if v != truth], count)


def _qa_row(rng, question, answer, paraphrase, truth, pool, num_perturbed, subject, **slots):
    """One row: the template filled with the true value, and with ``num_perturbed`` wrong ones."""
    return {
        "question": question.format(**slots),
        "answer": answer.format(value=truth, **slots),
        "paraphrased_answer": paraphrase.format(value=truth, **slots),
        "perturbed_answer": [answer.format(value=v, **slots)
                             for v in _wrong_values(rng, pool, truth, num_perturbed)],
        "author": subject,
    }


def _author_rows(rng: random.Random, name: str, facts_per_author: int, num_perturbed: int) -> list[dict]:
    rows = []
    for _, question, answer, paraphrase, pool in rng.sample(_AUTHOR_TEMPLATES, facts_per_author):
        rows.append(_qa_row(rng, question, answer, paraphrase, rng.choice(pool), pool,
                            num_perturbed, name, name=name))
    return rows


def tofu_mini(num_authors: int = 20, facts_per_author: int = 4, forget_fraction: float = 0.1,
              num_perturbed: int = 3, seed: int = 0) -> datasets.DatasetDict:
    """A procedurally generated TOFU-like set of fictitious authors.

    Each fictitious author (an invented name) gets ``facts_per_author`` facts drawn from
    eight templates (birthplace, birth year, genre, best known book, award, parents' jobs,
    home city). As in TOFU's forget01/05/10, whole authors are forgotten:
    ``round(forget_fraction * num_authors)`` (at least 1) of them form the forget split.

    Returns a ``DatasetDict`` with splits

    * ``forget``, ``retain``: the facts of the forgotten / the other authors;
    * ``holdout``: facts of as many further authors as are forgotten, same templates, never
      trained on;
    * ``real_authors`` (who wrote a famous book) and ``world_facts`` (capitals, continents):
      general facts the target model also learns, used for model utility;

    each with the string columns ``question``, ``answer`` (one short sentence),
    ``paraphrased_answer``, ``author`` (the subject: author name, or country for world
    facts) and ``perturbed_answer`` (list of ``num_perturbed`` wrong answers written with
    the answer's template). Deterministic given ``seed``; the vocabulary is small and closed,
    suited to the word-level tokenizer of :func:`alter.tiny.build_tokenizer`.
    """
    if not isinstance(num_authors, int) or num_authors < 2:
        raise ValueError(f"tofu_mini: num_authors must be an int >= 2, got {num_authors!r}")
    if not isinstance(facts_per_author, int) or not 1 <= facts_per_author <= len(_AUTHOR_TEMPLATES):
        raise ValueError(f"tofu_mini: facts_per_author must be an int in [1, {len(_AUTHOR_TEMPLATES)}], "
                         f"got {facts_per_author!r}")
    if not 0.0 < float(forget_fraction) < 1.0:
        raise ValueError(f"tofu_mini: forget_fraction must be in (0, 1), got {forget_fraction!r}")
    max_perturbed = len(_CONTINENTS) - 1  # the smallest value pool bounds the wrong answers
    if not isinstance(num_perturbed, int) or not 1 <= num_perturbed <= max_perturbed:
        raise ValueError(f"tofu_mini: num_perturbed must be an int in [1, {max_perturbed}], "
                         f"got {num_perturbed!r}")
    num_forget = max(1, round(forget_fraction * num_authors))
    if num_forget >= num_authors:
        raise ValueError(f"tofu_mini: forget_fraction={forget_fraction} forgets all {num_authors} "
                         "authors; nothing would be retained")

    rng = random.Random(seed)
    names = _invent_names(rng, num_authors + num_forget)
    trained, holdout = names[:num_authors], names[num_authors:]
    forgotten = set(rng.sample(trained, num_forget))
    splits: dict[str, list[dict]] = {"forget": [], "retain": [], "holdout": []}
    for name in trained:
        split = "forget" if name in forgotten else "retain"
        splits[split] += _author_rows(rng, name, facts_per_author, num_perturbed)
    for name in holdout:
        splits["holdout"] += _author_rows(rng, name, facts_per_author, num_perturbed)

    question, answer, paraphrase = _REAL_AUTHOR_TEMPLATE
    all_real = tuple(author for author, _ in _REAL_AUTHORS)
    splits["real_authors"] = [
        _qa_row(rng, question, answer, paraphrase, author, all_real, num_perturbed, author, title=title)
        for author, title in _REAL_AUTHORS]
    splits["world_facts"] = [
        _qa_row(rng, question, answer, paraphrase, facts[field], pool, num_perturbed, facts[0],
                country=facts[0])
        for question, answer, paraphrase, field, pool in _WORLD_TEMPLATES for facts in _COUNTRIES]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})


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


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


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


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` ending in the EOS token (when the tokenizer has one), so the model learns to stop."""
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _check_length(ids: list[int], max_length: int, what: str) -> None:
    if max_length is not None and len(ids) > max_length:
        shown = what if len(what) <= 80 else what[:77] + "..."
        raise ValueError(f"example {shown!r} is {len(ids)} tokens long, more than max_length={max_length}; "
                         "shorten it or raise max_length (it is not truncated silently)")


def encode_completion(tokenizer, prompt: str, completion: str, max_length: int | None,
                      add_eos: bool = True, add_special_tokens: bool = True) -> dict[str, list[int]]:
    """Token ids of ``prompt + completion`` (plus EOS when ``add_eos``), labelled on the
    completion only. ``add_special_tokens=False`` for text that already holds them (a
    rendered chat template).

    Returns ``dict(input_ids, attention_mask, labels)`` of equal-length int lists with
    ``labels`` = -100 on the prompt. Raises ``ValueError`` naming the prompt when the
    sequence is longer than ``max_length`` tokens (``None``: no limit).
    """
    # Only a departure from the default is passed on: minimal tokenizers take no keyword.
    kwargs = {} if add_special_tokens else {"add_special_tokens": False}
    prompt_ids = tokenizer(prompt, **kwargs)["input_ids"]
    input_ids = tokenizer(prompt + completion, **kwargs)["input_ids"]
    input_ids = _with_eos(tokenizer, input_ids) if add_eos else input_ids
    _check_length(input_ids, max_length, prompt)
    # Subword tokenizers can merge across the prompt/completion boundary: the completion
    # starts where the two token sequences part.
    prompt_len = 0
    while prompt_len < min(len(prompt_ids), len(input_ids)) and prompt_ids[prompt_len] == input_ids[prompt_len]:
        prompt_len += 1
    labels = [IGNORE_INDEX] * prompt_len + input_ids[prompt_len:]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_qa(tokenizer, question: str, answer: str, max_length: int | None,
              prompt_format: str | PromptFormat | None = None) -> dict[str, list[int]]:
    """Token ids of ``format_qa(question, answer)`` (or of another :class:`PromptFormat`)
    plus EOS, for training or scoring the answer.

    Returns ``dict(input_ids, attention_mask, labels)`` of equal-length int lists;
    ``labels`` is -100 on the prompt, so only the answer tokens (and EOS) are learned or
    scored. Raises ``ValueError`` naming the question when the example is longer than
    ``max_length`` tokens (``None``: no limit).
    """
    fmt = prompt_format_of(prompt_format)
    return encode_completion(tokenizer, fmt.prompt(tokenizer, question), fmt.completion(tokenizer, question, answer),
                             max_length, add_special_tokens=fmt.add_special_tokens)


def encode_text(tokenizer, text: str, max_length: int | None, truncate: bool = False) -> dict[str, list[int]]:
    """Token ids of a corpus text plus EOS, every token a label (language modelling).

    A text longer than ``max_length`` tokens raises ``ValueError`` naming it, unless
    ``truncate=True`` (long corpus documents, where a prefix is a fine training sample).
    """
    input_ids = _with_eos(tokenizer, tokenizer(text)["input_ids"])
    if truncate and max_length is not None:
        input_ids = input_ids[:max_length]
    _check_length(input_ids, max_length, text)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": list(input_ids)}


def _is_numeric_sequence(value) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, (list, tuple)) and all(isinstance(x, (int, float, bool)) for x in value))


def pad_id_of(tokenizer) -> int:
    """The id :func:`collate` pads with: the tokenizer's pad token, else its EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return pad


def collate(batch: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad encoded examples to the longest and stack them into tensors.

    ``input_ids`` is padded with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with
    -100 and any other per-token field (e.g. a cached ``entropy``) with 0; per-example
    numbers become a 1-D tensor and anything else a list. ``padding_side="left"`` is for
    generation. Returns a dict of ``[B, L]`` tensors (int64 ids, mask and labels).
    """
    if not batch:
        raise ValueError("collate: batch is empty")
    if padding_side not in ("left", "right"):
        raise ValueError(f"collate: padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    lengths = [len(example["input_ids"]) for example in batch]
    longest = max(lengths)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key in batch[0]:
        values = [example[key] for example in batch]
        per_token = all(_is_numeric_sequence(v) and len(v) == n for v, n in zip(values, lengths))
        if per_token:
            fill = pad_values.get(key, 0)
            rows = []
            for v, n in zip(values, lengths):
                v = torch.as_tensor(v)
                pad = torch.full((longest - n,), fill, dtype=v.dtype)
                rows.append(torch.cat([v, pad] if padding_side == "right" else [pad, v]))
            out[key] = torch.stack(rows)
        elif all(isinstance(v, (int, float, bool)) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


# --------------------------------------------------------------------------------------
# Benchmark loaders
# --------------------------------------------------------------------------------------

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
DATA_DIR_ENV = "ALTER_DATA_DIR"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection within ``timeout`` seconds: without this
    check, ``datasets`` retries for half a minute on a machine without network."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return True  # offline mode: datasets answers from its cache at once
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _local_data_files(path: Path, names: Sequence[str], what: str) -> list[Path]:
    """The data files of ``path``: the file itself, or, in a folder, for the first of
    ``names`` (relative, like ``"wmdp-bio/test"``) that matches: files named ``name.ext``
    or ``name-*.ext`` (hub shards, e.g. ``test-00000-of-00001.parquet``) and every data
    file under a folder ``name/``."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: local path {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    for name in names:
        folder, base = path / Path(name).parent, Path(name).name
        files = sorted(f for f in folder.glob("*") if f.is_file() and f.suffix in _LOCAL_FORMATS
                       and (f.stem == base or f.stem.startswith(base + "-")))
        if (folder / base).is_dir():
            files += sorted(f for f in (folder / base).rglob("*") if f.is_file() and f.suffix in _LOCAL_FORMATS)
        if files:
            return files
    tried = ", ".join(f"{n}.{{{','.join(e[1:] for e in _LOCAL_FORMATS)}}}" for n in names)
    raise FileNotFoundError(f"{what}: no data file in {str(path)!r} (looked for {tried}, or a folder of that name)")


def _load_local(path: Path, names: Sequence[str], what: str) -> datasets.Dataset:
    files = _local_data_files(path, names, what)
    formats = {_LOCAL_FORMATS.get(f.suffix) for f in files}
    if len(formats) != 1 or None in formats:
        raise ValueError(f"{what}: data files must share one format among "
                         f"{sorted(_LOCAL_FORMATS)}, got {[f.name for f in files]}")
    try:
        return datasets.load_dataset(formats.pop(), data_files=[str(f) for f in files], split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as exc:
        # What datasets raises for files without rows varies by format (and by version).
        raise ValueError(f"{what}: no rows could be read from {[f.name for f in files]}: the dataset is "
                         f"empty or malformed ({type(exc).__name__}: {exc})") from exc


def _load(hub_name: str, config: str | None, split: str, path, names: Sequence[str],
          required: Sequence[str], what: str) -> datasets.Dataset:
    """A dataset from local files at ``path`` when given, else from the hub; when the hub
    cannot be reached, from ``$ALTER_DATA_DIR/<hub repo name>`` if that is set."""
    if path is not None:
        ds = _load_local(Path(path), names, what)
    else:
        error = None
        if _hub_reachable():
            try:
                ds = datasets.load_dataset(hub_name, config, split=split)
            except (ConnectionError, OSError) as exc:  # datasets raises ConnectionError offline
                error = exc
        else:
            error = ConnectionError("the hub is not reachable")
        if error is not None:
            fallback = os.environ.get(DATA_DIR_ENV)
            if not fallback:
                raise ConnectionError(
                    f"{what}: could not load {hub_name!r} from the hub ({error}); pass path= to a "
                    f"local copy, or set {DATA_DIR_ENV} to a folder holding {hub_name.split('/')[-1]}/"
                ) from error
            ds = _load_local(Path(fallback) / hub_name.split("/")[-1], names, what)
    _check_schema(ds, required, what)
    return ds


def _check_schema(ds: datasets.Dataset, required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what}: missing required column(s) {missing}; the columns are {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"{what}: the dataset is empty")


def _check_string_lists(ds: datasets.Dataset, column: str, what: str) -> None:
    """``column`` holds lists of strings (Arrow columns are typed: one check covers every
    row). A CSV column of one string each would otherwise be scored character by character."""
    feature = ds.features[column]
    if getattr(getattr(feature, "feature", None), "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"{what}: column {column!r} must hold lists of strings, got {feature}")


def load_tofu(config: str = "forget10", path=None, split: str = "train") -> datasets.Dataset:
    """A TOFU config (``locuslab/TOFU``): ``forget10``, ``retain90``, ``forget10_perturbed``,
    ``real_authors_perturbed``, ``world_facts_perturbed``, ... (see ``shared/DATASETS.md``).

    ``path``: a data file, or a folder holding ``{config}.json`` / ``.jsonl`` / ``.parquet`` /
    ``.csv`` (or a folder ``{config}/``), e.g. ``shared/data/tofu``. Columns: ``question``,
    ``answer``; perturbed configs add ``perturbed_answer`` (list of strings) and, except for
    real authors and world facts, ``paraphrased_answer``.
    """
    if not isinstance(config, str) or not config:
        raise ValueError(f"load_tofu: config must be a non-empty string, got {config!r}")
    required = ["question", "answer"]
    if config.endswith("_perturbed"):
        required.append("perturbed_answer")
        if not config.startswith(("real_authors", "world_facts")):
            required.append("paraphrased_answer")
    what = f"load_tofu({config!r})"
    ds = _load("locuslab/TOFU", config, split, path, [config, f"{config}/{split}"], required, what)
    if "perturbed_answer" in required:
        _check_string_lists(ds, "perturbed_answer", what)
    return ds


_WMDP_CONFIGS = ("wmdp-bio", "wmdp-cyber", "wmdp-chem")
_MCQ_COLUMNS = ("question", "choices", "answer")


def load_wmdp(config: str = "wmdp-bio", path=None, split: str = "test") -> datasets.Dataset:
    """WMDP multiple-choice questions (``cais/wmdp``): ``question``, ``choices`` (4 strings),
    ``answer`` (int 0-3). ``path``: a data file, or a folder holding ``{config}.*`` or the
    hub layout ``{config}/test-*.parquet``."""
    check_choice("config", config, _WMDP_CONFIGS, "load_wmdp")
    return _load("cais/wmdp", config, split, path, [f"{config}/{split}", config], _MCQ_COLUMNS,
                 f"load_wmdp({config!r})")


def load_wmdp_corpus(path) -> datasets.Dataset:
    """A WMDP forget or retain corpus (e.g. ``bio-forget-corpus.jsonl``; the bio forget
    corpus is gated, so it is read from a local file): JSON lines with a ``text`` field."""
    if path is None:
        raise ValueError("load_wmdp_corpus: path is required (a JSON lines file with a 'text' field)")
    what = f"load_wmdp_corpus({str(path)!r})"
    ds = _load_local(Path(path), [Path(path).name], what)
    _check_schema(ds, ["text"], what)
    return ds


_MUSE_SPLITS = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
    "privleak": ("forget", "retain", "holdout"),
}
_MUSE_COLUMNS = {"raw": ("text",), "verbmem": ("prompt", "gt"), "knowmem": ("question", "answer"),
                 "privleak": ("text",)}


def load_muse(corpus: str = "News", subset: str = "raw", split: str | None = None, path=None) -> datasets.Dataset:
    """A MUSE subset (``muse-bench/MUSE-News`` or ``MUSE-Books``).

    ``subset="raw"`` (splits forget, retain1, retain2, holdout; column ``text``),
    ``"verbmem"`` (split forget; ``prompt``, ``gt``), ``"knowmem"`` (splits forget_qa,
    retain_qa and their ``_icl`` sets; ``question``, ``answer``) or ``"privleak"`` (the
    membership-inference texts: splits forget, retain, holdout; ``text``). ``split=None`` is the
    subset's first split. ``path``: a data file, or a folder (the corpus) holding
    ``{subset}/{split}.*`` or hub shards ``{subset}/{split}-*.parquet``.
    """
    check_choice("corpus", corpus, ("News", "Books"), "load_muse")
    check_choice("subset", subset, tuple(_MUSE_SPLITS), "load_muse")
    split = _MUSE_SPLITS[subset][0] if split is None else split
    check_choice("split", split, _MUSE_SPLITS[subset], "load_muse")
    return _load(f"muse-bench/MUSE-{corpus}", subset, split, path, [f"{subset}/{split}"],
                 _MUSE_COLUMNS[subset], f"load_muse({corpus!r}, {subset!r}, {split!r})")


def load_mmlu(subject: str = "all", path=None, split: str = "test") -> datasets.Dataset:
    """MMLU (``cais/mmlu``): ``question``, ``subject``, ``choices`` (4), ``answer`` (int).

    ``path``: a data file, or a folder holding ``{subject}.*``, ``{subject}/test-*`` or,
    for one subject, the ``all`` files (then filtered to that subject).
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"load_mmlu: subject must be a non-empty string, got {subject!r}")
    names = [f"{subject}/{split}", subject] + (["all/" + split, "all"] if subject != "all" else [])
    what = f"load_mmlu({subject!r})"
    ds = _load("cais/mmlu", subject, split, path, names, _MCQ_COLUMNS + ("subject",), what)
    if subject != "all":
        ds = ds.filter(lambda row: row["subject"] == subject)
        _check_schema(ds, _MCQ_COLUMNS, f"{what} (rows of subject {subject!r})")
    return ds
