"""The quality suite (alter.scenarios, alter.quality): deterministic generators, phrasings,
row formats, fact-token masks, and a smoke run of the runner and its report (says nothing
about quality)."""
import json

import pytest
import torch

from alter import quality, quality_report
from alter.scenarios import (DEVELOPMENT, DEVELOPMENT_SEEDS, HELD_OUT, HELD_OUT_SEEDS, Scenario, build_scenario,
                             fact_token_mask, generate_rows, model_text, to_dataset)

TINY = Scenario("tiny-test", "compounds", "qa", 6, 2, 2, "word", 1, 32, memorize_epochs=1, phrasings=("text", "bio"))
SEEN_SEEDS = {0, 1} | {seed for report in range(1, 8) for seed in range(100 * report, 100 * report + 5)}


def test_development_and_held_out_do_not_overlap():
    assert not {s.name for s in DEVELOPMENT} & {s.name for s in HELD_OUT}
    assert not {s.domain for s in DEVELOPMENT} & {s.domain for s in HELD_OUT}
    # The held-out sets of the fourth to seventh reports (seeds 400-704) were seen: development now.
    assert {"comets-qa-word", "chefs-bio-bpe", "lighthouses-text-bpe", "beetles-qa-200", "glaciers-qa-bpe",
            "perfumes-text-word", "locomotives-bio-bpe", "monasteries-qa-120", "vineyards-qa-bpe",
            "satellites-text-word", "manuscripts-bio-bpe", "orchestras-qa-90", "asteroids-text-bpe", "bridges-qa-word",
            "operas-bio-word", "fortresses-qa-100"} <= {s.name for s in DEVELOPMENT}
    assert not set(HELD_OUT_SEEDS) & SEEN_SEEDS and set(DEVELOPMENT_SEEDS) <= SEEN_SEEDS
    sizes = [s.forget_rows for s in DEVELOPMENT + HELD_OUT]
    assert min(sizes) <= 12 and max(sizes) >= 400  # the issue's ~10 to ~400 forget rows
    assert {s.format for s in HELD_OUT} == {"qa", "text", "bio"} and {s.tokenizer for s in HELD_OUT} == {"word", "bpe"}
    assert all(len(s.all_phrasings) >= 2 for s in HELD_OUT)
    assert any(len(s.all_phrasings) >= 2 for s in DEVELOPMENT)


def test_scenario_rejects_bad_phrasings():
    with pytest.raises(ValueError, match="phrasings"):
        Scenario("bad", "authors", "qa", 6, 2, 2, "word", 1, 32, phrasings=("qa",))
    with pytest.raises(ValueError, match="phrasings"):
        Scenario("bad", "authors", "qa", 6, 2, 2, "word", 1, 32, phrasings=("poem",))


@pytest.mark.parametrize("scenario", DEVELOPMENT + HELD_OUT, ids=lambda s: s.name)
def test_generators_are_deterministic_and_well_formed(scenario):
    rows = generate_rows(scenario, 7)
    assert rows == generate_rows(scenario, 7)
    assert rows != generate_rows(scenario, 8)
    facts = 1 if scenario.format == "bio" else scenario.facts_per_entity
    assert len(rows["forget"]) == scenario.forget_rows
    assert len(rows["retain"]) == (scenario.num_entities - scenario.num_forget) * facts
    assert len(rows["never_seen"]) == scenario.num_forget * facts
    entities = {split: {row["entity"] for row in rows[split]} for split in rows}
    assert len(entities["forget"]) == scenario.num_forget == len(entities["never_seen"])
    assert not entities["forget"] & entities["retain"] and not entities["never_seen"] & (entities["forget"] |
                                                                                          entities["retain"])
    for row in rows["forget"] + rows["retain"] + rows["never_seen"]:
        keys = {"question", "answer"} if scenario.format == "qa" else {"text"}
        assert keys <= set(row) and not ({"question", "text"} - keys) & set(row)
        assert len(row["spans"]) == (scenario.facts_per_entity if scenario.format == "bio" else 1)
        text = model_text(row)
        for start, end in row["spans"]:
            value = text[start:end]
            assert value and value == value.strip() and value in text
        if scenario.format == "qa":  # the same sentence with another value (DPO's preferred answer)
            (wrong,) = row["perturbed_answer"]
            start, end = row["spans"][0]
            offset = len(text) - len(row["answer"])
            head, tail = row["answer"][:start - offset], row["answer"][end - offset:]
            assert wrong != row["answer"] and wrong.startswith(head) and wrong.endswith(tail)
    assert set(to_dataset(rows["forget"]).column_names) == ({"question", "answer", "perturbed_answer"}
                                                            if scenario.format == "qa" else {"text"})


def _facts(rows):
    """(entity, value) of every fact of every split."""
    return {split: sorted((row["entity"], model_text(row)[s:e]) for row in split_rows for s, e in row["spans"])
            for split, split_rows in rows.items()}


@pytest.mark.parametrize("scenario", [s for s in DEVELOPMENT + HELD_OUT if len(s.all_phrasings) > 1],
                         ids=lambda s: s.name)
def test_every_phrasing_states_the_same_facts(scenario):
    """Each phrasing renders the same entities and values; the target memorizes every
    phrasing, the oracle every phrasing but the forget rows."""
    facts = {phrasing: _facts(generate_rows(scenario, 3, phrasing)) for phrasing in scenario.all_phrasings}
    assert all(f == facts[scenario.format] for f in facts.values())
    assert generate_rows(scenario, 3) == generate_rows(scenario, 3, scenario.format)
    kinds = {phrasing: generate_rows(scenario, 3, phrasing)["forget"][0] for phrasing in scenario.all_phrasings}
    assert len({model_text(row) for row in kinds.values()}) == len(kinds)  # really different texts


def test_build_scenario_gives_target_and_oracle_data():
    built = build_scenario(TINY, 0)
    per_phrasing = {p: built["phrasings"][p] for p in TINY.all_phrasings}
    assert built["rows"] == per_phrasing["qa"]
    size = sum(len(r["forget"]) + len(r["retain"]) for r in per_phrasing.values())
    assert len(built["memorize"]) == size
    assert len(built["oracle"]) == sum(len(r["retain"]) for r in per_phrasing.values())
    forget_texts = {model_text(row) for r in per_phrasing.values() for row in r["forget"]}
    oracle_rows = [{k: v for k, v in row.items() if v is not None} for row in built["oracle"]]
    assert not forget_texts & {model_text(row) for row in oracle_rows}
    never_seen = {model_text(row) for r in per_phrasing.values() for row in r["never_seen"]}
    memorized = [{k: v for k, v in row.items() if v is not None} for row in built["memorize"]]
    assert not never_seen & {model_text(row) for row in memorized}
    assert forget_texts <= {model_text(row) for row in memorized}


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
        method, config, params = quality.run_config(name)
        assert method == "alter" and config != quality.AlterConfig() and params is None
    assert quality.run_config("npo") == ("npo", None, None)


def test_relearn_split_halves_the_forgotten_entities():
    rows = generate_rows(Scenario("split-test", "authors", "qa", 12, 3, 5, "word", 1, 32), 0)["forget"]
    relearn, held = quality.relearn_split(rows)
    relearned, kept = {r["entity"] for r in relearn}, {r["entity"] for r in held}
    assert len(relearned) == 2 and len(kept) == 3 and not relearned & kept and len(relearn) + len(held) == len(rows)


@pytest.mark.parametrize("weights", sorted(quality.ATTACKED_WEIGHTS))
def test_the_relearning_attack_trains_the_weights_it_names(weights, monkeypatch):
    from alter.model import apply_alter
    from alter.config import AlterConfig

    built = build_scenario(TINY, 0)
    model = apply_alter(built["model"], AlterConfig(r=2, num_experts=3))
    trained = {}

    def record(attacked, *args, **kwargs):  # the fine-tune, stubbed: which weights would it train?
        trained.update((name, param.requires_grad) for name, param in attacked.named_parameters())

    monkeypatch.setattr(quality, "finetune", record)
    quality.relearned_scores(model, built, 0, weights)
    adapters = {name for name in trained if ".lora_" in name or ".router." in name}
    assert adapters and len(adapters) < len(trained)
    expected = {"all": set(trained), "adapters": adapters, "base": set(trained) - adapters}[weights]
    assert {name for name, on in trained.items() if on} == expected
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in adapters)  # on a copy


def test_quick_runner_writes_the_report(tmp_path):
    """run_pair / summarize / the Markdown and plot writers on a 1-layer model, 1 step a
    run (a smoke test: nothing about quality is asserted)."""
    torch.manual_seed(0)
    results = quality.run_pair(TINY, 0, ("alter", "grad_diff", "alter-no-structural"), max_steps=1)
    assert [r["run"] for r in results] == ["target", "oracle", "alter", "grad_diff", "alter-no-structural"]
    assert all(0.0 <= r["forget_acc"] <= 1.0 and 0.0 <= r["retain_acc"] <= 1.0 for r in results)
    for row in results:
        probabilities = [row[k] for k in ("mia_auc", "generation_hits", "plausible_answers", "held_back_acc",
                                          "relearn_acc", "forget_acc_text", "forget_acc_bio")]
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        assert ("forget_quality_bio" in row) == (row["run"] != "oracle")
    alter_row, grad_diff_row = results[2], results[3]
    assert alter_row["forget_routing_share"] is not None and grad_diff_row["forget_routing_share"] is None
    # The mean over the per-layer shares is the report's share (one per patched module).
    layers = alter_row["forget_routing_by_layer"]
    assert len(layers) == len(alter_row["routing_layers"]) > 1
    assert sum(layers) / len(layers) == pytest.approx(alter_row["forget_routing_share"], abs=1e-6)
    summary = quality_report.summarize(results + [dict(r, seed=1) for r in results])
    assert {e["seeds"] for e in summary} == {2}
    assert [e["run"] for e in summary] == ["target", "oracle", "alter", "grad_diff", "alter-no-structural"]
    assert summary[2]["forget_routing_by_layer"] == pytest.approx(layers)
    text = quality_report.format_markdown(summary, [TINY], [0, 1], 12.0, quick=True, results=results)
    assert "| tiny-test | **alter (default)** | 2 |" in text and "smoke sizes" in text
    table = text.split("## Results\n\n")[1].split("\n\n")[0].splitlines()
    assert len({line.count("|") for line in table}) == 1 and "held back acc" in table[0]  # one cell per column
    assert "| plausible |" in table[0]
    refused = {"scenario": "tiny-test", "run": "dpo", "seeds": 2, "refused": "dpo needs QA rows"}
    padded = quality_report.format_markdown(summary + [refused], [TINY], [0, 1], 12.0, quick=True, results=results)
    table = padded.split("## Results\n\n")[1].split("\n\n")[0].splitlines()
    assert len({line.count("|") for line in table}) == 1 and "refused: dpo needs QA rows" in table[-1]
    assert "## Routing per layer" in text and "| tiny-test | alter | 0.q_proj " in text
    assert "| grad_diff | 1 |" in text and "| alter-no-structural | 1 |" in text  # paired with ALTER
    (tmp_path / "QUALITY.json").write_text(json.dumps(
        {"scenarios": [TINY.to_dict()], "seeds": [0, 1], "seconds": 12.0, "quick": True, "summary": summary,
         "results": results}))
    quality_report.write_report(str(tmp_path))
    assert (tmp_path / "quality_tradeoff.png").stat().st_size > 0
    assert (tmp_path / "QUALITY.md").read_text() == text


def test_dominating_runs_and_targets():
    summary = [{"scenario": "s", "run": "oracle", "forget_acc": 0.30, "relearn_acc": 0.2},
               {"scenario": "s", "run": "alter", "forget_quality": 0.2, "retain_ratio": 0.96, "forget_acc": 0.33,
                "forget_quality_text": 0.005, "relearn_acc": 0.35},
               {"scenario": "s", "run": "npo", "forget_quality": 0.3, "retain_ratio": 0.97},
               {"scenario": "s", "run": "lora", "forget_quality": 0.9, "retain_ratio": 0.8},
               {"scenario": "s", "run": "grad_diff", "forget_quality": 0.2, "retain_ratio": 0.96},
               {"scenario": "s", "run": "target", "forget_quality": 1.0, "retain_ratio": 1.0}]
    assert quality_report.dominating_runs(summary) == {"s": ["npo"]}
    assert quality_report.meets_targets(summary) == {"s": {
        "forget_quality": True, "forget acc vs oracle": True, "retain_ratio": True, "other phrasings": False,
        "relearning": False}}


def test_a_scenario_with_more_entities_than_names_fails_clearly():
    """glaciers names are "{A}{b} Glacier": 144 of them; 150 entities cannot all differ."""
    with pytest.raises(ValueError, match="too small"):
        generate_rows(Scenario("too-many", "glaciers", "qa", 150, 1, 10, "word", 1, 32), 0)


def test_zoo_runs_name_every_supported_pair_off_the_default():
    from alter.methods import METHODS, method_class
    from alter.quality import ZOO_RUNS, run_config

    for name in ZOO_RUNS:
        method, config, params = run_config(name)
        assert config is None and params != method_class(method).default_params
        assert method_class(method).resolve_params(params) == params  # not a refused pair
    expected = sum(len(method_class(m).supported_params) - 1 for m in METHODS)
    assert len(ZOO_RUNS) == expected and {"simnpo@lora", "rmu@asym_lora", "undial@lora"} <= set(ZOO_RUNS)
    assert not any(name.startswith(("alter@", "lora@")) for name in ZOO_RUNS)


def test_paired_comparison_counts_and_sign_test():
    from scipy.stats import binomtest

    rows = []
    for seed, (fq_alter, fq_npo, rr_alter, rr_npo) in enumerate([(0.5, 0.1, 0.9, 0.8), (0.5, 0.1, 0.7, 0.8),
                                                                   (0.1, 0.5, 0.9, 0.8), (0.3, 0.3, 0.9, 0.9)]):
        rows += [{"scenario": "s", "seed": seed, "run": "alter", "forget_quality": fq_alter, "retain_ratio": rr_alter},
                 {"scenario": "s", "seed": seed, "run": "npo", "forget_quality": fq_npo, "retain_ratio": rr_npo},
                 {"scenario": "s", "seed": seed, "run": "target", "forget_quality": 0.0, "retain_ratio": 1.0}]
    rows.append({"scenario": "s", "seed": 0, "run": "dpo", "refused": "no QA rows"})
    (npo,) = quality_report.paired_comparison(rows)
    assert (npo["run"], npo["pairs"], npo["higher_quality"], npo["retain_kept"], npo["both"]) == ("npo", 4, 2, 3, 1)
    assert npo["sign_test_p"] == pytest.approx(binomtest(2, 4, 0.5, alternative="greater").pvalue)
