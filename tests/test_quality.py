"""The quality suite (alter.scenarios, alter.quality): deterministic generators, row formats,
fact-token masks, and a smoke run of the runner and its report (says nothing about quality)."""
import json

import pytest
import torch

from alter import quality
from alter.scenarios import (DEVELOPMENT, HELD_OUT, Scenario, build_scenario, fact_token_mask, generate_rows,
                             model_text, to_dataset)

TINY = Scenario("tiny-test", "compounds", "qa", 6, 2, 2, "word", 1, 32, memorize_epochs=1)


def test_development_and_held_out_do_not_overlap():
    assert not {s.name for s in DEVELOPMENT} & {s.name for s in HELD_OUT}
    assert not {s.domain for s in DEVELOPMENT} & {s.domain for s in HELD_OUT}
    sizes = [s.forget_rows for s in DEVELOPMENT + HELD_OUT]
    assert min(sizes) <= 12 and max(sizes) >= 400  # the issue's ~10 to ~400 forget rows
    assert {s.format for s in HELD_OUT} == {"qa", "text", "bio"} and {s.tokenizer for s in HELD_OUT} == {"word", "bpe"}


@pytest.mark.parametrize("scenario", DEVELOPMENT + HELD_OUT, ids=lambda s: s.name)
def test_generators_are_deterministic_and_well_formed(scenario):
    rows = generate_rows(scenario, 7)
    assert rows == generate_rows(scenario, 7)
    assert rows != generate_rows(scenario, 8)
    assert len(rows["forget"]) == scenario.forget_rows
    facts = 1 if scenario.format == "bio" else scenario.facts_per_entity
    assert len(rows["retain"]) == (scenario.num_entities - scenario.num_forget) * facts
    forgotten = {row["entity"] for row in rows["forget"]}
    assert len(forgotten) == scenario.num_forget and not forgotten & {row["entity"] for row in rows["retain"]}
    for row in rows["forget"] + rows["retain"]:
        keys = {"question", "answer"} if scenario.format == "qa" else {"text"}
        assert keys <= set(row) and not ({"question", "text"} - keys) & set(row)
        assert len(row["spans"]) == (scenario.facts_per_entity if scenario.format == "bio" else 1)
        text = model_text(row)
        for start, end in row["spans"]:
            value = text[start:end]
            assert value and value == value.strip() and value in text
    assert set(to_dataset(rows["forget"]).column_names) == ({"question", "answer"} if scenario.format == "qa"
                                                            else {"text"})


@pytest.mark.parametrize("tokenizer_kind,fmt", [("word", "qa"), ("bpe", "qa"), ("word", "bio"), ("bpe", "text")])
def test_fact_token_mask_covers_the_values_only(tokenizer_kind, fmt):
    """The masked tokens decode to the fact values (BPE: the sub-words of a value), and
    the ids are the ones encode_qa / encode_text train on (without the EOS)."""
    from alter.data import encode_qa, encode_text

    scenario = Scenario("mask-test", "missions", fmt, 8, 3, 2, tokenizer_kind, 1, 32)
    built = build_scenario(scenario, 0)
    tok = built["tokenizer"]
    for row in built["rows"]["forget"] + built["rows"]["retain"][:5]:
        ids, mask = fact_token_mask(tok, row)
        encoded = encode_qa(tok, row["question"], row["answer"], None) if fmt == "qa" else encode_text(tok, row["text"], None)
        assert encoded["input_ids"][:-1] == ids  # the trained ids, EOS appended
        text = model_text(row)
        values = [text[s:e] for s, e in row["spans"]]
        decoded = tok.decode([i for i, m in zip(ids, mask) if m]).replace(" ", "")
        assert decoded == "".join(values).replace(" ", "")
        assert not all(mask) and any(mask)


def test_fact_accuracy_is_one_for_a_model_that_predicts_the_text():
    """Teacher-forced argmax accuracy over fact tokens: a model whose logits put all mass
    on the true next token scores 1, a constant model scores the share of its token."""
    built = build_scenario(TINY, 0)
    tok, rows = built["tokenizer"], built["rows"]["forget"]

    class Oracle(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.shift = shift

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(tok))
            nxt = torch.roll(input_ids, -1, dims=1) if self.shift else torch.zeros_like(input_ids)
            logits.scatter_(-1, nxt[..., None], 1.0)
            return type("Out", (), {"logits": logits})()

    assert quality.fact_accuracy(Oracle(True), tok, rows, batch_size=3) == 1.0
    assert quality.fact_accuracy(Oracle(False), tok, rows) == 0.0


def test_ablations_each_change_one_config_field():
    for name in quality.ABLATIONS:
        method, config = quality.run_config(name)
        assert method == "alter" and config != quality.AlterConfig()
    assert quality.run_config("npo") == ("npo", None)


def test_quick_runner_writes_the_report(tmp_path):
    """run_pair / summarize / the Markdown and plot writers on a 1-layer model, 1 step a
    run (a smoke test: nothing about quality is asserted)."""
    torch.manual_seed(0)
    results = quality.run_pair(TINY, 0, ("alter", "grad_diff", "alter-no-structural"), max_steps=1)
    assert [r["run"] for r in results] == ["target", "alter", "grad_diff", "alter-no-structural"]
    assert all(0.0 <= r["forget_acc"] <= 1.0 and 0.0 <= r["retain_acc"] <= 1.0 for r in results)
    assert results[1]["forget_routing_share"] is not None and results[2]["forget_routing_share"] is None
    summary = quality.summarize(results + [dict(r, seed=1) for r in results])
    assert {e["seeds"] for e in summary} == {2}
    assert [e["run"] for e in summary] == ["target", "alter", "grad_diff", "alter-no-structural"]
    text = quality.format_markdown(summary, [TINY], [0, 1], 12.0, quick=True)
    assert "| tiny-test | **alter (default)** | 2 |" in text and "smoke sizes" in text
    (tmp_path / "QUALITY.json").write_text(json.dumps(
        {"scenarios": [TINY.to_dict()], "seeds": [0, 1], "seconds": 12.0, "quick": True, "summary": summary}))
    quality.write_report(str(tmp_path))
    assert (tmp_path / "quality_tradeoff.png").stat().st_size > 0
    assert (tmp_path / "QUALITY.md").read_text() == text


def test_dominating_runs():
    summary = [{"scenario": "s", "run": "alter", "forget_ratio": 0.4, "retain_ratio": 0.9},
               {"scenario": "s", "run": "npo", "forget_ratio": 0.3, "retain_ratio": 0.95},
               {"scenario": "s", "run": "lora", "forget_ratio": 0.2, "retain_ratio": 0.8},
               {"scenario": "s", "run": "grad_diff", "forget_ratio": 0.4, "retain_ratio": 0.9},
               {"scenario": "s", "run": "target", "forget_ratio": 0.0, "retain_ratio": 1.0}]
    assert quality.dominating_runs(summary) == {"s": ["npo"]}
