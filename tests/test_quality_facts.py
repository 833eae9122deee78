"""alter.evaluation.facts: the oracle-relative fact metrics of the quality suite, each
against a from-scratch reference on random inputs."""
import numpy as np
import pytest
import torch
from scipy import stats

from alter.data.facts import DOMAINS
from alter.data.scenarios import Scenario, build_scenario, fact_prompts, fact_token_spans
from alter.evaluation.facts import (fact_accuracy, fact_forget_quality, fact_mia_auc, fact_scores,
                                    generation_hit_rate, generation_rates, values_by_kind)

BIO = Scenario("facts-test", "ships", "bio", 7, 3, 3, "bpe", 1, 32, phrasings=("qa",))


class RandomLM(torch.nn.Module):
    """Logits a fixed random function of (position, token): a model the metrics can be
    recomputed for by hand."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(64, vocab, generator=torch.Generator().manual_seed(seed)) * 3)
        self.vocab = vocab

    def logits_of(self, ids: list[int]) -> torch.Tensor:
        return self.table[(torch.arange(len(ids)) * 7 + torch.tensor(ids)) % 64]

    def forward(self, input_ids, attention_mask):
        logits = self.table[(torch.arange(input_ids.shape[1])[None] * 7 + input_ids) % 64]
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("phrasing", ["bio", "qa"])
def test_fact_scores_against_a_float64_reference(phrasing):
    built = build_scenario(BIO, 1)
    tok = built["tokenizer"]
    rows = built["phrasings"][phrasing]["forget"] + built["phrasings"][phrasing]["retain"][:4]
    model = RandomLM(len(tok))
    got = fact_scores(model, tok, rows, batch_size=3)
    want_logprob, want_tokens, want_correct = [], [], []
    for row in rows:
        ids, owners = fact_token_spans(tok, row)
        logp = torch.log_softmax(model.logits_of(ids).detach().double(), -1)
        for k in range(len(row["spans"])):
            positions = [t for t in range(1, len(ids)) if owners[t] == k]
            want_logprob.append(sum(float(logp[t - 1, ids[t]]) for t in positions))
            want_tokens.append(len(positions))
            want_correct.append(sum(int(logp[t - 1].argmax()) == ids[t] for t in positions))
    assert len(got["logprob"]) == sum(len(r["spans"]) for r in rows) == len(want_logprob)
    np.testing.assert_allclose(got["logprob"], want_logprob, rtol=1e-5)
    np.testing.assert_array_equal(got["tokens"], want_tokens)
    np.testing.assert_array_equal(got["correct"], want_correct)
    assert fact_accuracy(model, tok, rows, batch_size=5) == pytest.approx(sum(want_correct) / sum(want_tokens))


def test_forget_quality_and_mia_auc_against_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(-5, 1, 37), rng.normal(-3, 2, 23)
    assert fact_forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert fact_forget_quality(a, a) == 1.0
    with pytest.raises(ValueError, match="fact_forget_quality"):
        fact_forget_quality([], b)
    members = {"logprob": rng.normal(-2, 1, 19), "tokens": rng.integers(1, 4, 19)}
    nonmembers = {"logprob": rng.normal(-6, 1, 11), "tokens": rng.integers(1, 4, 11)}
    loss_m, loss_n = -members["logprob"] / members["tokens"], -nonmembers["logprob"] / nonmembers["tokens"]
    want = np.mean([(n > m) + 0.5 * (n == m) for m in loss_m for n in loss_n])
    assert fact_mia_auc(members, nonmembers) == pytest.approx(want)


class ScriptedLM(RandomLM):
    """A model whose ``generate`` appends a scripted continuation per prompt."""

    def __init__(self, vocab, answers: dict):
        super().__init__(vocab)
        self.answers = answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(i for i, m in zip(ids, mask) if m)
            new = (self.answers[prompt] + [0] * max_new_tokens)[:max_new_tokens]
            rows.append(ids + new)
        return torch.tensor(rows)


def test_generation_hit_rate_counts_values_in_the_continuation():
    built = build_scenario(BIO, 2)
    tok = built["tokenizer"]
    rows = built["rows"]["forget"]
    pairs = [pair for row in rows for pair in fact_prompts(row)]
    answers, hits = {}, 0
    for i, (prompt, value) in enumerate(pairs):
        said = f" {value} and more" if i % 3 else " nothing"
        hits += bool(i % 3)
        answers[tuple(tok(prompt)["input_ids"])] = tok(said, add_special_tokens=False)["input_ids"]
    model = ScriptedLM(len(tok), answers)
    assert generation_hit_rate(model, tok, rows, max_new_tokens=12, batch_size=4) == pytest.approx(hits / len(pairs))


@pytest.mark.parametrize("phrasing", ["bio", "qa"])
def test_plausible_answers_count_any_value_of_the_facts_kind(phrasing):
    built = build_scenario(BIO, 3)
    tok = built["tokenizer"]
    rows = built["phrasings"][phrasing]["forget"]
    everyone = [r for split in ("forget", "retain", "never_seen") for r in built["phrasings"][phrasing][split]]
    kinds = values_by_kind(everyone)
    facts = [(pair, kind, row["entity"]) for row in rows for pair, kind in zip(fact_prompts(row), row["kinds"])]
    answers, hits, plausible = {}, 0, 0
    for i, ((prompt, value), kind, entity) in enumerate(facts):
        others = sorted(kinds[kind] - {value})
        other_kind = sorted(next(v for k, v in kinds.items() if k != kind) - kinds[kind])
        said = [" nothing",
                f" {value}.",  # the value: a hit, plausible
                f" maybe {others[i % len(others)]}",  # another entity's value of the kind: plausible
                f" {entity} is {other_kind[i % len(other_kind)]}",  # the name restated, another kind's value
                f" {value}0"][i % 5]  # not the value as a whole word
        hits += i % 5 == 1
        plausible += i % 5 in (1, 2)
        answers[tuple(tok(prompt)["input_ids"])] = tok(said, add_special_tokens=False)["input_ids"]
    model = ScriptedLM(len(tok), answers)
    rates = generation_rates(model, tok, rows, kinds, max_new_tokens=16, batch_size=4)
    assert rates == pytest.approx({"hits": hits / len(facts), "plausible": plausible / len(facts)})
    assert generation_rates(model, tok, rows, None, max_new_tokens=16) == pytest.approx({"hits": hits / len(facts)})
    # every value of a kind, from whichever row states it; the kinds the generator draws
    assert set(kinds) <= {kind for kind, *_ in DOMAINS["ships"][1]}
    assert all(len(values) > 1 for values in kinds.values())


def test_generation_rates_refuse_rows_without_a_kind_per_fact():
    built = build_scenario(BIO, 3)
    rows = built["rows"]["forget"]
    model = ScriptedLM(len(built["tokenizer"]), {})
    with pytest.raises(ValueError, match="needs kinds, one per fact"):
        generation_rates(model, built["tokenizer"], [dict(rows[0], kinds=rows[0]["kinds"][:-1])], {})
    with pytest.raises(ValueError, match="kind_values has no values of the kinds"):
        generation_rates(model, built["tokenizer"], rows, {})


def test_fact_prompts_end_before_the_value():
    built = build_scenario(BIO, 0)
    for phrasing, split in built["phrasings"].items():
        row = split["forget"][0]
        for (prompt, value), (start, end) in zip(fact_prompts(row), row["spans"]):
            assert value and not prompt.endswith(" ")
            if phrasing == "qa":
                assert prompt == f"Question: {row['question']}\nAnswer:"
            else:
                assert row["text"][:start].rstrip() == prompt
