"""AlterConfig(forget_tokens="unpredictable"), the default: the forget loss pushes down the
forget tokens a trigram model of the retain rows does not predict, the retain NLL keeps the
others, and the early stop counts the unpredictable ones. The split against a plain-Python
reference, the kept term against its formula in float64, the stop share's resolution, and
the default run (the sequence route under asym_lora)."""
import collections
import dataclasses
import random

import pytest
import torch

from alter.config import AlterConfig
from alter.data import IGNORE_INDEX, collate
from alter.methods.forget_tokens import RETAIN_NGRAM_ORDER, split_predictable
from alter.train import unlearn
from alter.training.args import DEFAULT_EARLY_STOP_SHARE, UNPREDICTABLE_EARLY_STOP_SHARE, UnlearnArgs
from conftest import small_model


def reference_predicted(retain_rows: list[list[int]], row: list[int], t: int):
    """The most frequent token after the longest context (up to 2 tokens) before ``t`` that
    occurs in a retain row; ties to the continuation counted first."""
    for n in range(min(RETAIN_NGRAM_ORDER - 1, t), -1, -1):
        context = tuple(row[t - n:t])
        nexts = collections.Counter(r[i] for r in retain_rows for i in range(n, len(r)) if tuple(r[i - n:i]) == context
                                    and i >= 1)
        if nexts:
            return nexts.most_common(1)[0][0]
    return None


def example(ids, labelled_from=1):
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * labelled_from + list(ids[labelled_from:])}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_matches_the_reference_and_partitions_the_labels(seed):
    rng = random.Random(seed)
    vocab = 9  # small: contexts recur, so both sides of the split occur
    retain = [example([rng.randrange(vocab) for _ in range(rng.randint(3, 17))]) for _ in range(7)]
    forget = [example([rng.randrange(vocab) for _ in range(rng.randint(4, 15))], labelled_from=rng.randint(1, 3))
              for _ in range(5)]
    split = split_predictable(forget, retain)
    retain_rows = [e["input_ids"] for e in retain]
    assert len(split) == len(forget)  # every forget row keeps an unpredictable token here
    kept = unpredictable = 0
    for before, after in zip(forget, split):
        assert after["input_ids"] == before["input_ids"] and before["labels"] == example(before["input_ids"],
                                                                                         before["labels"].count(-100))["labels"]
        for t, label in enumerate(before["labels"]):
            if label == IGNORE_INDEX:
                assert after["labels"][t] == after["keep_labels"][t] == IGNORE_INDEX
                continue
            predictable = reference_predicted(retain_rows, before["input_ids"], t) == label
            assert (after["keep_labels"][t], after["labels"][t]) == ((label, IGNORE_INDEX) if predictable
                                                                     else (IGNORE_INDEX, label))
            kept, unpredictable = kept + predictable, unpredictable + (not predictable)
    assert kept and unpredictable
    assert "keep_labels" not in forget[0]  # new dicts


def test_a_continuation_the_retain_rows_teach_is_kept_and_a_new_value_is_forgotten():
    # retain: "<s> X is in paris ." / forget: "<s> Y is in rome ." (ids: 1 <s>, 2 is, 3 in, 4 paris, 5 ., 6 X, 7 Y, 8 rome)
    retain = [example([1, 6, 2, 3, 4, 5])]
    forget = split_predictable([example([1, 7, 2, 3, 8, 5])], retain)[0]
    # "Y" after "<s>": the retain row has "X" there; "rome" after "is in": "paris"; "in"
    # after "is": the template, as in the retain row.
    assert forget["labels"][1] == 7 and forget["labels"][4] == 8  # the entity and the new value
    assert forget["keep_labels"][3] == 3  # "in" after "is": the template
    # a forget row with nothing the retain rows do not predict is dropped; none left: an error
    rows = split_predictable([example([1, 6, 2, 3, 4, 5]), example([1, 7, 2, 3, 8, 5])], retain)
    assert len(rows) == 1 and rows[0]["input_ids"][1] == 7
    with pytest.raises(ValueError, match="retain rows predict every labelled forget token"):
        split_predictable([example([1, 6, 2, 3, 4, 5])], retain)


def test_collate_pads_keep_labels_as_labels():
    forget = split_predictable([example([1, 7, 2, 3, 8, 5]), example([1, 7, 2])], [example([1, 6, 2, 3, 4, 5])])
    batch = collate(forget, pad_token_id=0)
    assert batch["keep_labels"].shape == batch["labels"].shape
    assert (batch["keep_labels"][1, 3:] == IGNORE_INDEX).all()


def test_kept_term_is_gamma_times_the_nll_of_the_predictable_tokens(data, tokenizer):
    from alter.methods import build

    args = UnlearnArgs(config=AlterConfig(r=4, num_experts=3, gamma=0.7))
    method = build(args, torch.autocast)  # only the config and the single-process reduction are read
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    keep = torch.tensor([[-100, 3, -100, 5, -100, -100], [-100, -100, 10, 0, -100, -100]])
    logs = {}
    total = method.with_kept_tokens(torch.tensor(1.5, dtype=torch.float64), logs, logits, {"keep_labels": keep})
    logp = torch.log_softmax(logits, -1)
    targets = [(0, 0, 3), (0, 2, 5), (1, 1, 10), (1, 2, 0)]  # the logit before each labelled token
    expected = -sum(logp[b, t, y] for b, t, y in targets) / len(targets)
    torch.testing.assert_close(total, 1.5 + 0.7 * expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logs["kept"], expected.detach(), rtol=1e-12, atol=1e-12)
    # a batch without predictable tokens adds 0, not NaN; one without keep_labels adds nothing
    none = method.with_kept_tokens(torch.tensor(1.5), {}, logits, {"keep_labels": torch.full_like(keep, -100)})
    assert none.item() == 1.5
    assert method.with_kept_tokens(2.0, {}, logits, {}) == 2.0


@pytest.mark.parametrize("method, config, share", [
    ("alter", AlterConfig(), UNPREDICTABLE_EARLY_STOP_SHARE),
    ("asym_lora", AlterConfig(), UNPREDICTABLE_EARLY_STOP_SHARE),
    ("alter", AlterConfig(forget_tokens="all"), DEFAULT_EARLY_STOP_SHARE),
    ("grad_diff", AlterConfig(), DEFAULT_EARLY_STOP_SHARE),  # reads no config weights: every token
])
def test_auto_early_stop_share_follows_the_forget_tokens(method, config, share):
    assert UnlearnArgs(method=method, config=config).early_stop_share == share
    assert UnlearnArgs(method=method, config=config, early_stop_share=0.3).early_stop_share == 0.3
    assert UnlearnArgs(method=method, config=config, early_stop_share=None).early_stop_share is None


def test_config_refuses_unknown_forget_tokens():
    with pytest.raises(ValueError, match="forget_tokens must be one of"):
        AlterConfig(forget_tokens="some")
    assert AlterConfig.paper().forget_tokens == "all" and AlterConfig.paper().routing == "token"


def test_default_run_forgets_the_unpredictable_tokens_under_the_sequence_route(data, tokenizer):
    model = small_model(tokenizer)
    unlearn(model, tokenizer, data["forget"], data["retain"], AlterConfig(r=4, num_experts=3), "alter",
            batch_size=2, max_steps=2, progress=False)
    report, saved = model.unlearn_report, model.alter_config
    assert saved.routing == "sequence" and saved.route_keys and report.router_warmup == 0
    assert {"forget", "kept", "retain"} <= set(report.losses) and "route" not in report.losses
    # explicit settings are kept: the per-token routers, every forget token
    model = small_model(tokenizer)
    config = AlterConfig(r=4, num_experts=3, routing="token", forget_tokens="all")
    unlearn(model, tokenizer, data["forget"], data["retain"], config, "alter", batch_size=2, max_steps=2,
            router_warmup=1, progress=False)
    assert model.alter_config.routing == "token" and model.unlearn_report.router_warmup == 1
    assert "kept" not in model.unlearn_report.losses and "route" in model.unlearn_report.losses
    # one adapter (lora) has no forget expert to route to: its router learns expert 0
    model = small_model(tokenizer)
    unlearn(model, tokenizer, data["forget"], data["retain"], AlterConfig(r=4, num_experts=3), "grad_diff",
            params="lora", batch_size=2, max_steps=1, progress=False)
    assert model.alter_config.routing == "token"


def test_same_config_fields_round_trip():
    config = AlterConfig(forget_tokens="all", routing=None)
    assert dataclasses.replace(config).to_dict()["forget_tokens"] == "all"
    assert AlterConfig(**config.to_dict()) == config
