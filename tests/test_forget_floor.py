"""AlterConfig.forget_floor (on by default, with the unpredictable tokens): each forget
token is aimed at the log-probability a backoff n-gram of the retain rows gives it, pushed
down to it from above and, a kept (predictable) one, held up to it from below. The floor
against a plain-Python stupid backoff, the losses' choice of tokens and the early stop's
count against float64 references, the config's checks, and a run under it."""
import math
import random

import pytest
import torch

from alter.config import AlterConfig
from alter.data import IGNORE_INDEX, collate
from alter.methods import build
from alter.methods.forget_tokens import FLOOR_BACKOFF, FLOOR_UNSEEN, RETAIN_NGRAM_ORDER, split_predictable
from alter.train import unlearn
from alter.training.args import UnlearnArgs
from alter.training.schedule import label_scores
from conftest import small_model
from test_forget_tokens import example


def reference_log_probability(retain_rows: list[list[int]], row: list[int], t: int, token: int) -> float:
    """Stupid backoff, counted afresh: the token's share of the continuations of the
    longest context (up to 2 tokens) before ``t`` that a retain row continues with it,
    times FLOOR_BACKOFF for each context seen in the retain rows but not with it."""
    weight = 1.0
    for n in range(min(RETAIN_NGRAM_ORDER - 1, t), -1, -1):
        context = tuple(row[t - n:t])
        nexts = [r[i] for r in retain_rows for i in range(max(n, 1), len(r)) if tuple(r[i - n:i]) == context]
        if nexts:
            if token in nexts:
                return math.log(weight * nexts.count(token) / len(nexts))
            weight *= FLOOR_BACKOFF
    return math.log(weight * FLOOR_UNSEEN)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_floor_is_the_retain_ngrams_stupid_backoff_of_each_forget_token(seed):
    rng = random.Random(seed)
    vocab = 11  # token 10 never occurs in a retain row: the unseen floor
    retain = [example([rng.randrange(vocab - 1) for _ in range(rng.randint(3, 17))]) for _ in range(7)]
    forget = [example([rng.randrange(vocab) for _ in range(rng.randint(4, 15))], labelled_from=rng.randint(1, 3))
              for _ in range(6)]
    plain = split_predictable(forget, retain)
    floored = split_predictable(forget, retain, floor=True)
    assert "forget_floor" not in plain[0]
    retain_rows = [e["input_ids"] for e in retain]
    checked = set()
    for without, row in zip(plain, floored):
        assert row["labels"] == without["labels"] and row["keep_labels"] == without["keep_labels"]
        for t, (label, kept) in enumerate(zip(row["labels"], row["keep_labels"])):
            if label == kept == IGNORE_INDEX:
                assert row["forget_floor"][t] == 0.0
                continue
            target = label if label != IGNORE_INDEX else kept
            expected = reference_log_probability(retain_rows, row["input_ids"], t, target)
            assert row["forget_floor"][t] == pytest.approx(expected, rel=1e-12)
            checked.add("kept" if kept != IGNORE_INDEX else "unseen" if label == vocab - 1 else "counted")
    assert checked == {"unseen", "counted", "kept"}


def test_floor_of_a_hand_counted_row():
    # retain: "<s> X is in paris ." twice, "<s> Z is in oslo ."; forget "<s> Y is in rome ." and
    # "<s> Y is in oslo ." (ids: 1 <s>, 2 is, 3 in, 4 paris, 5 ., 6 X, 7 Y, 8 rome, 9 Z, 10 oslo)
    retain = [example([1, 6, 2, 3, 4, 5]), example([1, 6, 2, 3, 4, 5]), example([1, 9, 2, 3, 10, 5])]
    rome, oslo = split_predictable([example([1, 7, 2, 3, 8, 5]), example([1, 7, 2, 3, 10, 5])], retain, floor=True)
    # "oslo" after "is in": 1 of its 3 continuations
    assert oslo["labels"][4] == 10 and oslo["forget_floor"][4] == pytest.approx(math.log(1 / 3))
    # "rome" never occurs: unseen, after passing the contexts "is in", "in" and the empty one
    assert rome["forget_floor"][4] == pytest.approx(math.log(FLOOR_BACKOFF ** 3 * FLOOR_UNSEEN))
    # "Y" after "<s>": unseen too, after "<s>" and the empty context
    assert rome["forget_floor"][1] == pytest.approx(math.log(FLOOR_BACKOFF ** 2 * FLOOR_UNSEEN))
    # kept: "is" (after "<s> Y", neither context seen: the unigram, 3 of 15 retain tokens) and
    # "in" (after "is": always), whose floor is then log 1 (held all the way up)
    assert rome["keep_labels"][2] == 2 and rome["forget_floor"][2] == pytest.approx(math.log(3 / 15))
    assert rome["keep_labels"][3] == 3 and rome["forget_floor"][3] == pytest.approx(0.0)


def _method(config: AlterConfig):
    return build(UnlearnArgs(config=config), torch.autocast)


def _forget_batch(logits, offsets, seed):
    """Random ``labels`` and ``keep_labels`` (each labelled token in one of them; a shorter
    row) and floors at each token's float64 log-probability in ``logits`` plus ``offsets``,
    drawn in turn (0.0: exactly at it)."""
    generator = torch.Generator().manual_seed(seed)
    batch, length, vocab = logits.shape
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    targets[:, 0] = IGNORE_INDEX
    targets[1, 4:] = IGNORE_INDEX
    is_kept = torch.rand(batch, length, generator=generator) < 0.5
    labels = torch.where(is_kept, IGNORE_INDEX, targets)
    keep_labels = torch.where(is_kept, targets, IGNORE_INDEX)
    logp = torch.log_softmax(logits.detach().double(), -1)
    floor = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for t in range(1, length):
            if targets[b, t] != IGNORE_INDEX:
                floor[b, t] = logp[b, t - 1, targets[b, t]] + offsets[(b * length + t) % len(offsets)]
    return {"labels": labels, "keep_labels": keep_labels, "forget_floor": floor}, targets, logp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_token_is_aimed_at_its_floor(dtype):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 13, dtype=dtype) * 3
    batch, targets, logp = _forget_batch(logits, (0.5, -0.5, 0.7, -0.2), seed=0)
    aimed = _method(AlterConfig()).toward_floor(logits, batch)
    kinds = set()
    for b in range(3):
        for t in range(1, 7):
            target, floor = targets[b, t].item(), batch["forget_floor"][b, t]
            kept = batch["keep_labels"][b, t].item() != IGNORE_INDEX
            above = target != IGNORE_INDEX and logp[b, t - 1, target] > floor
            below = target != IGNORE_INDEX and logp[b, t - 1, target] < floor
            # pushed down: every token above its floor; held up: the kept ones below theirs
            assert aimed["labels"][b, t].item() == (target if above else IGNORE_INDEX)
            assert aimed["keep_labels"][b, t].item() == (target if below and kept else IGNORE_INDEX)
            kinds.add((kept, bool(above), bool(below))) if target != IGNORE_INDEX else None
    assert kinds == {(k, a, not a) for k in (True, False) for a in (True, False)}  # every case occurs
    plain = {"labels": batch["labels"], "keep_labels": batch["keep_labels"]}
    assert _method(AlterConfig()).toward_floor(logits, plain) is plain  # no floor: as it is


def test_a_token_exactly_at_its_floor_is_neither_pushed_nor_held():
    torch.manual_seed(2)
    logits = torch.randn(3, 7, 13, dtype=torch.float64)
    batch, targets, _ = _forget_batch(logits, (0.0,), seed=2)
    aimed = _method(AlterConfig()).toward_floor(logits, batch)
    assert (targets != IGNORE_INDEX).any()
    assert (aimed["labels"] == IGNORE_INDEX).all() and (aimed["keep_labels"] == IGNORE_INDEX).all()


def test_gradient_reaches_the_tokens_above_their_floor_and_the_kept_below():
    torch.manual_seed(1)
    method = _method(AlterConfig(forget_floor=True, backend="eager"))
    logits = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    batch, _, _ = _forget_batch(logits, (1.0, -1.0, -1.0, 1.0, -1.0), seed=1)
    first_unpredictable = tuple((batch["labels"] != IGNORE_INDEX).nonzero()[0])
    batch["forget_floor"][first_unpredictable] += 3.0  # below its floor: in neither loss
    aimed = method.toward_floor(logits, batch)
    loss, _ = method.ihl(logits, aimed["labels"], 1.0)  # every token weighted: random logits are high-entropy
    method.with_kept_tokens(loss, {}, logits, aimed).backward()
    grad_rows = logits.grad[:, :-1].abs().sum(-1) > 0  # the logits before each target
    trained = (aimed["labels"][:, 1:] != IGNORE_INDEX) | (aimed["keep_labels"][:, 1:] != IGNORE_INDEX)
    assert torch.equal(grad_rows, trained)
    assert (aimed["labels"] != IGNORE_INDEX).any() and (aimed["keep_labels"] != IGNORE_INDEX).any()
    assert (batch["labels"] != IGNORE_INDEX).sum() + (batch["keep_labels"] != IGNORE_INDEX).sum() > trained.sum()


def test_early_stop_counts_the_tokens_above_their_floor(data, tokenizer):
    from alter.methods.data import encode_dataset

    model = small_model(tokenizer)
    retain = encode_dataset(tokenizer, data["retain"], "retain", None)
    forget = split_predictable(encode_dataset(tokenizer, data["forget"], "forget", None), retain, floor=True)
    scores = label_scores(model, forget, tokenizer.pad_token_id, batch_size=3)  # batches of unequal lengths
    expected = []
    with torch.no_grad():
        for row in forget:
            logp = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0].double(), -1)
            expected += [logp[t - 1, label].item() > row["forget_floor"][t]
                         for t, label in enumerate(row["labels"]) if t > 0 and label != IGNORE_INDEX]
    assert scores.predicted.tolist() == expected
    plain = label_scores(model, [{k: v for k, v in row.items() if k != "forget_floor"} for row in forget],
                         tokenizer.pad_token_id, batch_size=3)
    assert len(plain.predicted) == len(expected) and plain.probability == pytest.approx(scores.probability)


def test_collate_pads_the_floor():
    retain = [example([1, 6, 2, 3, 4, 5])]
    rows = split_predictable([example([1, 7, 2, 3, 8, 5]), example([1, 7, 2])], retain, floor=True)
    batch = collate(rows, pad_token_id=0)
    assert batch["forget_floor"].shape == batch["labels"].shape and batch["forget_floor"].dtype == torch.float32


def test_config_checks_and_resolves_the_floor():
    with pytest.raises(ValueError, match="forget_floor must be a bool or None"):
        AlterConfig(forget_floor=1)
    with pytest.raises(ValueError, match="forget_floor needs forget_tokens='unpredictable'"):
        AlterConfig(forget_floor=True, forget_tokens="all")
    # None, the default: on with the unpredictable tokens, off with every token (no floor there)
    assert AlterConfig().forget_floor is None and AlterConfig().floors_forget_tokens is True
    assert AlterConfig(forget_tokens="all").floors_forget_tokens is False
    assert AlterConfig.paper().floors_forget_tokens is False
    assert AlterConfig(forget_floor=False).floors_forget_tokens is False
    for value in (None, True, False):
        assert AlterConfig.from_dict(AlterConfig(forget_floor=value).to_dict()).forget_floor is value


@pytest.mark.parametrize("method", ["alter", "asym_lora"])
def test_a_run_under_the_floor(data, tokenizer, method, monkeypatch):
    from alter.methods.alter import Alter
    from alter.methods.base import Method

    seen, aimed_batches, forget_labels, kept_labels = [], [], [], []
    original, original_ihl = Method.toward_floor, Method.ihl
    original_kept, original_one_pass = Method.with_kept_tokens, Alter.terms_in_one_pass

    def spy(self, logits, forget):
        aimed = original(self, logits, forget)
        seen.append(("forget_floor" in forget, int((aimed["labels"] != IGNORE_INDEX).sum())))
        aimed_batches.append(aimed)
        return aimed

    def ihl(self, logits, labels, high_entropy_weight):
        forget_labels.append(labels)
        return original_ihl(self, logits, labels, high_entropy_weight)

    def one_pass(self, logits, batch, is_forget):
        if is_forget:
            forget_labels.append(batch["labels"])
        return original_one_pass(self, logits, batch, is_forget)

    def kept(self, loss, logs, logits, forget):
        kept_labels.append(forget["keep_labels"])
        return original_kept(self, loss, logs, logits, forget)

    monkeypatch.setattr(Method, "toward_floor", spy)
    monkeypatch.setattr(Method, "ihl", ihl)
    monkeypatch.setattr(Method, "with_kept_tokens", kept)
    monkeypatch.setattr(Alter, "terms_in_one_pass", one_pass)
    model = small_model(tokenizer)
    unlearn(model, tokenizer, data["forget"], data["retain"], AlterConfig(r=4, num_experts=3, forget_floor=True),
            method, batch_size=2, max_steps=3, early_stop_share=0.0, progress=False)
    assert model.unlearn_report.steps == 3 and model.alter_config.forget_floor is True
    # every step's forget loss saw the floors, and tokens above them to push down
    assert len(seen) == 3 and all(floored and count > 0 for floored, count in seen)
    # both losses train on what toward_floor chose, not on the batch as it came
    assert len(forget_labels) == len(kept_labels) == 3
    for aimed, pushed, held in zip(aimed_batches, forget_labels, kept_labels):
        assert pushed is aimed["labels"] and held is aimed["keep_labels"]
    seen.clear()
    model = small_model(tokenizer)
    unlearn(model, tokenizer, data["forget"], data["retain"], AlterConfig(r=4, num_experts=3, forget_floor=False),
            method, batch_size=2, max_steps=3, early_stop_share=0.0, progress=False)
    assert len(seen) == 3 and not any(floored for floored, _ in seen)


def test_nll_ascent_on_a_batch_the_floor_emptied_is_zero_not_nan():
    method = _method(AlterConfig(forget_loss="nll_ascent", backend="eager"))
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss, count = method.ihl(logits, torch.full((2, 5), IGNORE_INDEX), 1.0)
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("method, config, words", [
    ("alter", AlterConfig(), "still above their floor"),
    ("asym_lora", AlterConfig(), "still above their floor"),
    ("alter", AlterConfig(forget_floor=False), "still predicted"),
    ("alter", AlterConfig(forget_tokens="all"), "still predicted (weighted)"),
    ("grad_diff", AlterConfig(), "still predicted (weighted)"),
])
def test_the_report_says_what_the_early_stop_counted(method, config, words):
    from alter.training.loop import early_stop_counts, why_ended

    args = UnlearnArgs(method=method, config=config)
    assert early_stop_counts(build(args, torch.autocast)) == words
    ended = why_ended(True, [(7, 0.2)], False, args, 100, words)
    assert ended == f"early stop at unlearning step 7: 0.20 of the forget tokens {words} <= early_stop_share " \
                    f"{args.early_stop_share}"
