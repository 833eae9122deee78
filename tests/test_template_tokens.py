"""AlterConfig.template_tokens (off by default; needs the unpredictable tokens): a forget token
that nearly every retain row most like its row holds at the aligned place ("was mapped by"
after a glacier's name) is kept, held up and never pushed, whatever the trigram says. The
marks against a brute-force reference (every retain row ranked, no candidate filter), a
hand-built case, the split's fields and the config's checks."""
import math
import random
from difflib import SequenceMatcher

import pytest

from alter.config import AlterConfig
from alter.data import IGNORE_INDEX
from alter.methods.forget_tokens import (TEMPLATE_AGREEMENT, TEMPLATE_CANDIDATES, TEMPLATE_NEIGHBOURS,
                                         split_predictable, template_tokens)
from test_forget_tokens import example

# ids: 1 <s>, 2 "?", 3 "Answer:", 4 ".", 5 EOS; templates: (question words, answer words before the value)
TEMPLATES = (([10, 11], [12, 13, 14]), ([15, 16, 17], [12, 18, 19]), ([20], [21, 22]))
POOL = list(range(30, 34))  # values shared among entities: each retain value recurs


def qa_row(template: int, entity: int, value: int) -> dict:
    question, answer = TEMPLATES[template]
    prompt = [1] + question + [entity, 2, 3]
    return example(prompt + [entity] + answer + [value, 4, 5], labelled_from=len(prompt))


def text_row(template: int, entity: int, value: int) -> dict:
    _, answer = TEMPLATES[template]
    return example([entity] + answer + [value, 4, 5], labelled_from=0)


def reference_marks(forget: list[dict], retain: list[dict]) -> list[list[bool]]:
    """Every retain row ranked by difflib ratio of the prompts (whole rows for rows
    labelled from the start), ties to the earlier row; votes over the aligned labelled parts."""
    def first(e):
        return next((t for t, label in enumerate(e["labels"]) if label != IGNORE_INDEX), len(e["labels"]))

    def key(e):
        return e["input_ids"][:first(e)] or e["input_ids"]

    marks = []
    for f in forget:
        ranked = sorted(range(len(retain)), key=lambda j: (
            -SequenceMatcher(None, key(f), key(retain[j]), autojunk=False).ratio(), j))
        labelled = f["input_ids"][first(f):]
        votes = [0] * len(labelled)
        for j in ranked[:TEMPLATE_NEIGHBOURS]:
            other = retain[j]["input_ids"][first(retain[j]):]
            for a, _, n in SequenceMatcher(None, labelled, other, autojunk=False).get_matching_blocks():
                for k in range(a, a + n):
                    votes[k] += 1
        needed = math.ceil(TEMPLATE_AGREEMENT * min(TEMPLATE_NEIGHBOURS, len(retain)) - 1e-9)
        marks.append([False] * first(f) + [v >= needed for v in votes])
    return marks


@pytest.mark.parametrize("seed,row", [(0, qa_row), (1, qa_row), (2, text_row)])
def test_marks_match_the_brute_force_reference(seed, row):
    rng = random.Random(seed)
    # more retain rows than TEMPLATE_CANDIDATES: the candidate filter is in play
    retain = [row(rng.randrange(3), 100 + i, rng.choice(POOL)) for i in range(TEMPLATE_CANDIDATES + 37)]
    forget = [row(rng.randrange(3), 300 + i, rng.choice(POOL + [40, 41])) for i in range(9)]
    assert template_tokens(forget, retain) == reference_marks(forget, retain)


@pytest.mark.parametrize("row", [qa_row, text_row])
def test_template_words_are_marked_and_the_name_and_value_are_not(row):
    retain = [row(i % 3, 100 + i, POOL[i % len(POOL)]) for i in range(36)]
    forget = row(0, 300, POOL[0])  # a value a quarter of its template's retain rows hold too
    marks, = template_tokens([forget], retain)
    ids = forget["input_ids"]
    start = next(t for t, label in enumerate(forget["labels"]) if label != IGNORE_INDEX)
    words = dict(zip(ids[start:], marks[start:]))
    assert not any(marks[:max(start, 1)])  # the prompt, and position 0 (no row predicts it)
    assert words[300] is False and words[POOL[0]] is False  # the entity's name, its value
    assert all(words[w] for w in TEMPLATES[0][1] + [4, 5])  # "was mapped by", ".", EOS


def test_split_keeps_template_words_held_at_log_one():
    retain = [qa_row(i % 3, 100 + i, POOL[i % len(POOL)]) for i in range(36)]
    forget = [qa_row(0, 300, 40), qa_row(1, 301, 41)]
    plain = split_predictable(forget, retain, floor=True)
    held = split_predictable(forget, retain, floor=True, template=True)
    marks = template_tokens(forget, retain)
    moved = 0
    for before, after, mark in zip(plain, held, marks):
        for t in range(1, len(mark)):
            given = before["labels"][t] if before["labels"][t] != IGNORE_INDEX else before["keep_labels"][t]
            if mark[t]:
                assert after["labels"][t] == IGNORE_INDEX and after["keep_labels"][t] == given
                assert after["forget_floor"][t] == 0.0
                moved += before["labels"][t] != IGNORE_INDEX
            else:
                assert after["labels"][t] == before["labels"][t] and after["keep_labels"][t] == before["keep_labels"][t]
                assert after["forget_floor"][t] == before["forget_floor"][t]
    assert moved > 0  # the trigram left some template word unpredictable: the case this is for
    # the entity's name and the value stay in the forget loss
    assert 300 in held[0]["labels"] and 40 in held[0]["labels"]


def test_every_retain_row_must_agree_when_fewer_than_ten():
    # 3 retain rows: 0.9 of 3 rounds up to all 3; a word 2 of them hold is no template word
    retain = [qa_row(0, 100, 30), qa_row(0, 101, 31), qa_row(0, 102, 32)]
    odd = dict(retain[2], input_ids=[13 if t == 12 else t for t in retain[2]["input_ids"]])
    forget = qa_row(0, 300, 40)
    ids = forget["input_ids"]
    marks, = template_tokens([forget], retain)
    assert marks[ids.index(12)] and marks[ids.index(13)]
    marks, = template_tokens([forget], retain[:2] + [odd])
    assert not marks[ids.index(12)] and marks[ids.index(13)]


def test_an_unlabelled_token_inside_the_answer_is_no_template_word():
    retain = [qa_row(i % 3, 100 + i, POOL[i % len(POOL)]) for i in range(36)]
    forget = qa_row(0, 300, 40)
    hidden = forget["input_ids"].index(13)
    forget["labels"][hidden] = IGNORE_INDEX
    marks, = template_tokens([forget], retain)
    assert not marks[hidden] and marks[hidden + 1]


def test_more_neighbours_than_candidates_still_vote():
    retain = [qa_row(0, 100 + i, POOL[i % len(POOL)]) for i in range(TEMPLATE_CANDIDATES + 20)]
    forget = qa_row(0, 300, 40)
    marks, = template_tokens([forget], retain, neighbours=TEMPLATE_CANDIDATES + 10)
    assert marks[forget["input_ids"].index(14)]


def test_no_retain_rows_marks_nothing():
    forget = [qa_row(0, 300, 40)]
    assert template_tokens(forget, []) == [[False] * len(forget[0]["input_ids"])]


def test_config_checks_template_tokens():
    assert AlterConfig().template_tokens is False and AlterConfig.paper().template_tokens is False
    with pytest.raises(ValueError, match="template_tokens must be a bool"):
        AlterConfig(template_tokens=None)
    with pytest.raises(ValueError, match="template_tokens needs forget_tokens='unpredictable'"):
        AlterConfig(template_tokens=True, forget_tokens="all")
    for value in (True, False):
        assert AlterConfig.from_dict(AlterConfig(template_tokens=value).to_dict()).template_tokens is value
