"""Which forget tokens an unlearning run forgets (``AlterConfig.forget_tokens``
"unpredictable", the default): the split of each forget example's labelled tokens into
those a model that never saw the forget rows would not predict and those it would
(:func:`split_predictable`), by an n-gram model of the retain rows (:class:`RetainNgram`,
which also gives each token its floor, ``AlterConfig.forget_floor``) and, as an option,
by the template words the retain rows most like each row share
(:func:`template_tokens`, ``AlterConfig.template_tokens``); docs/training.md, "Forget
tokens", "A floor under the forget loss", "Template words"."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from alter.data import IGNORE_INDEX


# The context length + 1 of the retain n-gram model of split_predictable.
RETAIN_NGRAM_ORDER = 3
# The floor's stupid backoff (Brants et al., 2007): a context's relative frequency, times
# FLOOR_BACKOFF for each step back to a shorter context that does hold the token, and
# FLOOR_UNSEEN for a token no retain example holds.
FLOOR_BACKOFF = 0.4
FLOOR_UNSEEN = 1e-4


class RetainNgram:
    """An n-gram model of the retain examples' tokens (counted over every token, contexts of
    up to ``order - 1`` tokens), as a model that never saw the forget rows would know them."""

    def __init__(self, retain_examples: list[dict], order: int = RETAIN_NGRAM_ORDER):
        self.order = order
        self.counts = [defaultdict(Counter) for _ in range(order)]
        for example in retain_examples:
            ids = example["input_ids"]
            for t in range(1, len(ids)):
                for n in range(min(order, t + 1)):
                    self.counts[n][tuple(ids[t - n:t])][ids[t]] += 1
        self.predictions = [{context: nexts.most_common(1)[0][0] for context, nexts in table.items()}
                            for table in self.counts]
        self.totals = [{context: sum(nexts.values()) for context, nexts in table.items()} for table in self.counts]

    def _contexts(self, ids: list[int], t: int):
        """The contexts of ``ids[t]``, longest first: (length, context)."""
        for n in range(min(self.order - 1, t), -1, -1):
            yield n, tuple(ids[t - n:t])

    def predicted(self, ids: list[int], t: int) -> int | None:
        """The most frequent next token after the longest context of ``ids[t]`` that occurs
        in a retain example (None when none does)."""
        for n, context in self._contexts(ids, t):
            guess = self.predictions[n].get(context)
            if guess is not None:
                return guess
        return None

    def log_probability(self, ids: list[int], t: int, token: int) -> float:
        """log p(``token`` at ``t`` | the tokens before it), stupid backoff: the token's share
        of the continuations of the longest context seen with it, times FLOOR_BACKOFF per
        seen context passed over; FLOOR_UNSEEN (times those) for a token never seen."""
        weight = 1.0
        for n, context in self._contexts(ids, t):
            total = self.totals[n].get(context)
            if total:
                count = self.counts[n][context].get(token, 0)
                if count:
                    return math.log(weight * count / total)
                weight *= FLOOR_BACKOFF
        return math.log(weight * FLOOR_UNSEEN)


# The template rule of split_predictable: a forget token is a template word when at least
# TEMPLATE_AGREEMENT of the TEMPLATE_NEIGHBOURS retain examples most like its example hold
# it at the aligned place; the likeness is ranked among the TEMPLATE_CANDIDATES retain
# examples of highest Dice overlap of distinct tokens with it (a sparse product, not a
# difflib ratio per pair).
TEMPLATE_NEIGHBOURS = 10
TEMPLATE_AGREEMENT = 0.9
TEMPLATE_CANDIDATES = 50


def _first_label(example: dict) -> int:
    """Position of an example's first labelled token (its length when it has none)."""
    return next((t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX), len(example["labels"]))


def _likeness_key(example: dict, first: int) -> list[int]:
    """The tokens an example is compared by: its prompt (the tokens before its first
    label, at ``first``), or the whole example when it is labelled from the start (a text
    row)."""
    return list(example["input_ids"][:first] if first else example["input_ids"])


def _presence(keys: list[list[int]], vocab: int):
    """Binary token-presence matrix ``[len(keys), vocab]`` (scipy CSR, float64)."""
    from scipy.sparse import csr_matrix
    columns = [sorted(set(key)) for key in keys]
    indptr = np.cumsum([0] + [len(c) for c in columns])
    indices = np.fromiter((t for c in columns for t in c), dtype=np.int64, count=int(indptr[-1]))
    return csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(keys), vocab))


def template_tokens(forget_examples: list[dict], retain_examples: list[dict],
                    neighbours: int = TEMPLATE_NEIGHBOURS, agreement: float = TEMPLATE_AGREEMENT) -> list[list[bool]]:
    """Per forget example, per token, whether it is a template word: a labelled token
    (past position 0, which no row predicts) that at least ``agreement`` of the
    ``neighbours`` retain examples most like the example (all of them when there are
    fewer) hold at the aligned place. Likeness: ``difflib`` ratio of the examples'
    prompts (of the whole examples for those labelled from the start), among the
    ``max(TEMPLATE_CANDIDATES, neighbours)`` retain examples of highest Dice overlap of
    distinct prompt tokens; alignment: ``difflib`` matching blocks of the labelled parts
    (``difflib``'s junk heuristic on, which leaves rows under 200 tokens as they are and
    keeps long corpus texts to ~0.1 s a row). A model that never saw the forget rows still
    says "was mapped by" after a glacier's name: the question told it which fact comes,
    which the trigram of :func:`split_predictable` cannot see."""
    from difflib import SequenceMatcher
    if not forget_examples or not retain_examples:
        return [[False] * len(e["input_ids"]) for e in forget_examples]
    needed = math.ceil(agreement * min(neighbours, len(retain_examples)) - 1e-9)
    count = min(max(TEMPLATE_CANDIDATES, neighbours), len(retain_examples))
    forget_firsts = [_first_label(e) for e in forget_examples]
    retain_firsts = [_first_label(e) for e in retain_examples]
    forget_keys = [_likeness_key(e, first) for e, first in zip(forget_examples, forget_firsts)]
    retain_keys = [_likeness_key(e, first) for e, first in zip(retain_examples, retain_firsts)]
    vocab = 1 + max(max(e["input_ids"], default=0) for e in forget_examples + retain_examples)
    forget_bags, retain_bags = _presence(forget_keys, vocab), _presence(retain_keys, vocab).T.tocsr()
    retain_sizes = np.asarray(retain_bags.sum(0)).ravel()
    labelled_parts = [list(e["input_ids"][first:]) for e, first in zip(retain_examples, retain_firsts)]
    marks = []
    for i, example in enumerate(forget_examples):
        # one row of Dice at a time: a dense [F, R] would not fit for large sets
        shared = (forget_bags[i] @ retain_bags).toarray().ravel()
        dice = 2 * shared / np.maximum(len(set(forget_keys[i])) + retain_sizes, 1)
        candidates = np.argpartition(-dice, count - 1)[:count] if count < len(retain_examples) \
            else np.arange(len(retain_examples))
        ranked = sorted(candidates.tolist(), key=lambda j: (
            -SequenceMatcher(None, forget_keys[i], retain_keys[j], autojunk=True).ratio(), j))
        ids, labels, first = example["input_ids"], example["labels"], forget_firsts[i]
        labelled = list(ids[first:])
        votes = [0] * len(labelled)
        for j in ranked[:neighbours]:
            for a, _, n in SequenceMatcher(None, labelled, labelled_parts[j], autojunk=True).get_matching_blocks():
                for k in range(a, a + n):
                    votes[k] += 1
        marks.append([False] * first + [v >= needed and labels[first + k] != IGNORE_INDEX and first + k > 0
                                          for k, v in enumerate(votes)])
    return marks


def split_predictable(forget_examples: list[dict], retain_examples: list[dict],
                      order: int = RETAIN_NGRAM_ORDER, floor: bool = False, template: bool = False) -> list[dict]:
    """The forget examples with their labelled tokens split in two (new dicts): ``labels``
    keeps the tokens an n-gram model of the retain examples does not predict, and
    ``keep_labels`` (int64 ids, -100 elsewhere) holds those it does, which a model that
    never saw the forget rows predicts too: a BPE word's continuation, a template word, a
    value common among retained entities (``AlterConfig.forget_tokens="unpredictable"``).

    The n-gram model (:class:`RetainNgram`) predicts a token from up to ``order - 1``
    tokens before it: the most frequent next token after the longest of those contexts
    that occurs in a retain example (counted over every token of the retain examples).
    With ``template`` (``AlterConfig.template_tokens``) the template words of
    :func:`template_tokens` are kept too, whatever the n-gram says. With ``floor``
    (``AlterConfig.forget_floor``) each example also gets ``forget_floor``: float ``[L]``,
    the n-gram's log-probability of each token of ``labels`` and of ``keep_labels``
    (:meth:`RetainNgram.log_probability`; a template word's is 0.0, log 1: held, never
    pushed; 0.0 elsewhere), the level the run aims that token at
    (:meth:`alter.methods.base.Method.toward_floor`). Forget examples left without an
    unpredictable token are dropped (they hold nothing to forget); ValueError when none
    is left."""
    ngram = RetainNgram(retain_examples, order)
    templates = template_tokens(forget_examples, retain_examples) if template else None
    split = []
    for i, example in enumerate(forget_examples):
        ids, given = example["input_ids"], list(example["labels"])
        labels, keep = list(given), [IGNORE_INDEX] * len(given)
        held = templates[i] if template else [False] * len(given)
        for t in range(1, len(labels)):
            if labels[t] != IGNORE_INDEX and (held[t] or ngram.predicted(ids, t) == labels[t]):
                keep[t], labels[t] = labels[t], IGNORE_INDEX
        if any(label != IGNORE_INDEX for label in labels):
            fields = {"labels": labels, "keep_labels": keep}
            if floor:
                # every labelled token, in whichever half of the split it went
                fields["forget_floor"] = [0.0 if label == IGNORE_INDEX or held[t] else ngram.log_probability(ids, t, label)
                                          for t, label in enumerate(given)]
            split.append({**example, **fields})
    if not split:
        also = " or the template words of the retain rows like them (template_tokens=True)" if template else ""
        raise ValueError(f"forget_tokens='unpredictable': the retain rows predict every labelled forget token{also}, "
                         "so there is nothing to forget that a model without the forget rows would not know; pass "
                         "AlterConfig(forget_tokens='all') to push every token down"
                         + (", or template_tokens=False" if template else ""))
    return split
