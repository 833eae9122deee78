"""``tofu_mini``: a procedurally generated TOFU-like set of fictitious authors, small enough
for a tiny model to memorize and unlearn on a CPU in minutes."""
from __future__ import annotations

import random
from typing import Sequence

import datasets

from alter.data.facts import draw_unused, syllable_word

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
    def draw() -> str:
        first = syllable_word(rng, _SYLLABLES, 2).capitalize()
        last = (syllable_word(rng, _SYLLABLES, 2) + rng.choice(_SURNAME_ENDINGS)).capitalize()
        return f"{first} {last}"

    used: set[str] = set()
    return [draw_unused(draw, used) for _ in range(count)]


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
