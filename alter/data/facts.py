"""Invented words for the fictitious-knowledge generators (:mod:`alter.data.tofu_mini`,
:mod:`alter.data.scenarios`). Every word is drawn from a seeded ``random.Random``, so the
same seed gives the same data."""
from __future__ import annotations

import random
from typing import Callable, Sequence


def syllable_word(rng: random.Random, syllables: Sequence[str], count: int) -> str:
    """``count`` syllables drawn with replacement and joined, in lower case."""
    return "".join(rng.choice(syllables) for _ in range(count))


def draw_unused(draw: Callable[[], str], used: set[str]) -> str:
    """The first result of ``draw()`` not in ``used`` (added to it): invented names must not
    collide, or two entities would share facts."""
    while True:
        word = draw()
        if word not in used:
            used.add(word)
            return word
