"""Membership inference (LOSS, ZLib, Min-K%, Min-K%++, reference), its AUC and MUSE's
PrivLeak, extraction strength and exact memorization: each against a direct float64
transcription of open-unlearning's / MUSE's definition."""
import json
import zlib

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alter import eval as E
from alter.data import encode_qa, encode_text, qa_texts, tofu_mini
from alter.tiny import build_tokenizer, tiny_llama
from test_eval import BigramLM, random_table

REAL_AUTHORS = "/work/shared/data/tofu/real_authors_perturbed.json"


@pytest.fixture(scope="module")
def data():
    return tofu_mini(num_authors=4, facts_per_author=2, forget_fraction=0.5, num_perturbed=2, seed=3)


def real_author_answers(n=8):
    """Answers of TOFU's real_authors set (real text with varied zlib lengths), else tofu_mini's."""
    try:
        with open(REAL_AUTHORS) as f:
            return [json.loads(line)["answer"] for line in f][:n]
    except OSError:
        return list(tofu_mini(seed=0)["real_authors"]["answer"])[:n]


@pytest.fixture(scope="module")
def tokenizer(data):
    return build_tokenizer(qa_texts(data) + real_author_answers())


# ------------------------------------------------------------------ float64 references


def logits64(model, ids: list[int]) -> torch.Tensor:
    """float64 logits ``[L, V]`` of one unpadded sequence: a BigramLM's table rows, or the
    forward pass of a float64 copy of a real model."""
    if isinstance(model, BigramLM):
        return model.table.double()[torch.tensor(ids)]
    return model(input_ids=torch.tensor([ids])).logits[0].double()


def reference_stats(model64, encoded: dict, eos: int):
    """(log p of every labelled token, and without a final EOS: log p, log-softmax rows,
    greedy predictions, targets), float64, by the definition."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    logp_rows = torch.log_softmax(logits64(model64, ids), dim=-1)
    positions = [t for t in range(1, len(ids)) if labels[t] != -100]
    logp = np.array([logp_rows[t - 1, ids[t]].item() for t in positions])
    if ids[positions[-1]] == eos:
        positions = positions[:-1]
    rows = logp_rows[[t - 1 for t in positions]]
    targets = [ids[t] for t in positions]
    return logp, logp[:len(positions)], rows, rows.argmax(-1).tolist(), targets


def reference_scores(model64, encoded, texts, eos, k, ref64=None) -> dict:
    out = {a: [] for a in E.MIA_ATTACKS}
    for enc, text in zip(encoded, texts):
        logp, token_logp, rows, _, _ = reference_stats(model64, enc, eos)
        loss = -logp.mean()
        n_low = max(1, int(len(token_logp) * k))
        z = []
        for row, lp in zip(rows, token_logp):
            p = row.exp()
            finite = p > 0  # masked tokens (logit -inf) have p = 0 and add nothing
            mu = (p[finite] * row[finite]).sum().item()
            var = (p[finite] * row[finite] ** 2).sum().item() - mu ** 2
            z.append((lp - mu) / np.sqrt(max(var, 1e-6)))
        out["loss"].append(loss)
        out["zlib"].append(loss / len(zlib.compress(text.encode("utf-8"))))
        out["min_k"].append(-np.mean(sorted(token_logp)[:n_low]))
        out["min_k_plus_plus"].append(-np.mean(sorted(z)[:n_low]))
        if ref64 is not None:
            out["reference"].append(loss + reference_stats(ref64, enc, eos)[0].mean())
    return {a: np.array(v) for a, v in out.items() if v}


def float64_copy(model):
    copy = tiny_llama(model.config.vocab_size, hidden_size=model.config.hidden_size,
                      num_layers=model.config.num_hidden_layers, num_heads=model.config.num_attention_heads)
    copy.load_state_dict(model.state_dict())
    return copy.double().eval()


# ------------------------------------------------------------------------ MIA scores


@settings(max_examples=4, deadline=None)
@given(k=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_mia_scores_of_qa_match_float64_on_a_bigram_model(data, tokenizer, k, seed):
    # Random logits with a -inf column (the pad token), returned as a non-contiguous view.
    table = random_table(len(tokenizer), seed)
    model, reference = BigramLM(table, strided=True), BigramLM(random_table(len(tokenizer), seed + 1))
    rows = list(data["forget"]) + list(data["holdout"])
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    encoded = [encode_qa(tokenizer, q, a, None) for q, a in zip(questions, answers)]
    expected = reference_scores(model, encoded, answers, tokenizer.eos_token_id, k, reference)
    for attack in E.MIA_ATTACKS:
        got = E.mia_scores(model, tokenizer, answers, attack, questions=questions, k=k, batch_size=3,
                           reference_model=reference if attack == "reference" else None)
        assert got.dtype == np.float64 and np.isfinite(got).all()
        np.testing.assert_allclose(got, expected[attack], rtol=1e-5, atol=1e-6, err_msg=attack)


def test_mia_scores_of_texts_match_float64_on_a_tiny_llama(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1)
    model64 = float64_copy(model)
    texts = real_author_answers() + ["Jane Austen wrote Emma in the year 1815."]
    encoded = [encode_text(tokenizer, t, None) for t in texts]
    expected = reference_scores(model64, encoded, texts, tokenizer.eos_token_id, 0.4)
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        got = E.mia_scores(model, tokenizer, texts, attack, batch_size=4)  # padded batches
        np.testing.assert_allclose(got, expected[attack], rtol=1e-4, err_msg=attack)  # float32 forward


def test_mia_scores_cut_texts_at_max_length(tokenizer):
    # A text cut at max_length has no EOS: Min-K% then scores its last token too.
    model = BigramLM(random_table(len(tokenizer), 5))
    text = "Jane Austen wrote Emma in the year 1815."
    encoded = encode_text(tokenizer, text, 5, truncate=True)
    assert encoded["input_ids"][-1] != tokenizer.eos_token_id
    expected = reference_scores(model, [encoded], [text], tokenizer.eos_token_id, 1.0)
    got = E.mia_scores(model, tokenizer, [text], "min_k", k=1.0, max_length=5)
    np.testing.assert_allclose(got, expected["min_k"], rtol=1e-6)
    with pytest.raises(ValueError, match="max_length=5"):  # without max_length: the context (none here)
        E.mia_scores(tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=5),
                     tokenizer, [text], "loss")


def test_mia_scores_reject_bad_input(tokenizer):
    model = BigramLM(random_table(len(tokenizer)))
    with pytest.raises(ValueError, match="attack must be one of"):
        E.mia_scores(model, tokenizer, ["Emma"], "gradnorm")
    with pytest.raises(ValueError, match="reference_model is required"):
        E.mia_scores(model, tokenizer, ["Emma"], "reference")
    with pytest.raises(ValueError, match="used by no other"):
        E.mia_scores(model, tokenizer, ["Emma"], "loss", reference_model=model)
    with pytest.raises(ValueError, match=r"k must be in \(0, 1\]"):
        E.mia_scores(model, tokenizer, ["Emma"], "min_k", k=0.0)
    with pytest.raises(ValueError, match="no tokens to score"):
        E.mia_scores(model, tokenizer, [""], "min_k")
    with pytest.raises(TypeError, match="texts must be a sequence of strings"):
        E.mia_scores(model, tokenizer, "Emma", "loss")


# ------------------------------------------------------------------ AUC and privleak


def brute_force_auc(members, nonmembers) -> float:
    """Mann-Whitney count: pairs where the non-member scores higher, ties half."""
    pairs = [(1.0 if n > m else 0.5 if n == m else 0.0) for m in members for n in nonmembers]
    return sum(pairs) / len(pairs)


@settings(max_examples=25, deadline=None)
@given(members=st.lists(st.integers(-5, 5), min_size=1, max_size=12),
       nonmembers=st.lists(st.integers(-5, 5), min_size=1, max_size=12))
def test_mia_auc_is_the_mann_whitney_pair_count(members, nonmembers):
    # Small integers: ties are frequent.
    assert E.mia_auc(members, nonmembers) == pytest.approx(brute_force_auc(members, nonmembers), abs=1e-12)


def test_mia_auc_direction_and_bad_input():
    assert E.mia_auc([0.1, 0.2], [0.5, 0.9, 0.3]) == 1.0  # members have the lower loss
    assert E.mia_auc([0.5, 0.9], [0.1, 0.2]) == 0.0
    with pytest.raises(ValueError, match="member_scores contains NaN"):
        E.mia_auc([float("nan")], [1.0])
    with pytest.raises(ValueError, match="nonmember_scores must be a non-empty"):
        E.mia_auc([1.0], [])


def muse_auc(forget_scores, holdout_scores) -> float:
    """MUSE's AUC (metrics/privleak.py: roc_curve(y, -score), forget labelled 0, holdout 1):
    the fraction of (forget, holdout) pairs where the holdout text has the higher -score."""
    pairs = [(1.0 if -h > -f else 0.5 if h == f else 0.0) for f in forget_scores for h in holdout_scores]
    return sum(pairs) / len(pairs)


@settings(max_examples=20, deadline=None)
@given(auc_unlearned=st.floats(0.0, 1.0), auc_retain=st.floats(0.0, 0.99))
def test_privleak_is_muses_relative_auc_difference(auc_unlearned, auc_retain):
    muse_u, muse_r = 1 - auc_unlearned, 1 - auc_retain
    assert E.privleak(auc_unlearned, auc_retain) == pytest.approx((muse_u - muse_r) / muse_r * 100, rel=1e-12,
                                                                 abs=1e-9)


def test_privleak_with_muses_auc_convention():
    forget, holdout = [0.2, 0.5, 0.9, 1.3], [0.4, 1.0, 1.6, 2.0, 2.2]
    retain_forget, retain_holdout = [1.1, 0.7, 2.0, 1.5], [0.6, 1.2, 1.9, 1.4, 2.1]
    # MUSE: pairs (forget, holdout) where the forget text has the higher score (less likely).
    muse_u, muse_r = muse_auc(forget, holdout), muse_auc(retain_forget, retain_holdout)
    assert muse_u == pytest.approx(1 - E.mia_auc(forget, holdout))
    got = E.privleak(E.mia_auc(forget, holdout), E.mia_auc(retain_forget, retain_holdout))
    assert got == pytest.approx((muse_u - muse_r) / muse_r * 100)
    assert got < 0  # the forget texts are still the likelier ones: under-unlearned
    with pytest.raises(ValueError, match="undefined"):
        E.privleak(0.5, 1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        E.privleak(1.5, 0.5)


# --------------------------------------------------------------- ES and EM, end to end


def memorizing_table(tokenizer, answers, questions, seed=0):
    """Random bigram logits, boosted towards the next token of the last ``t`` tokens of
    each answer (t varying), so greedy prediction gets suffixes of different lengths right."""
    table = random_table(len(tokenizer), seed)
    for j, (q, a) in enumerate(zip(questions, answers)):
        enc = encode_qa(tokenizer, q, a, None)
        ids = enc["input_ids"]
        start = len(ids) - 1 - j % (sum(label != -100 for label in enc["labels"]))
        for t in range(start, len(ids)):
            table[ids[t - 1], ids[t]] = 40.0
    return table


def open_unlearning_es_em(preds, labels):
    """open-unlearning's memorization.py, transcribed: the loop leaves k at n - 1 when no
    suffix matches."""
    n = len(labels)
    for k in range(n):
        if preds[k:] == labels[k:]:
            break
    return 1 - k / n, np.mean([p == y for p, y in zip(preds, labels)])


def test_extraction_strength_and_exact_memorization_match_open_unlearning(data, tokenizer):
    rows = list(data["forget"]) + list(data["retain"])
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    model = BigramLM(memorizing_table(tokenizer, answers, questions))
    es = E.extraction_strength(model, tokenizer, questions, answers, batch_size=3)
    em = E.exact_memorization(model, tokenizer, questions, answers, batch_size=3)
    expected = [open_unlearning_es_em(*reference_stats(model, encode_qa(tokenizer, q, a, None),
                                                       tokenizer.eos_token_id)[3:])
                for q, a in zip(questions, answers)]
    np.testing.assert_allclose(es, [e for e, _ in expected], rtol=1e-12)
    np.testing.assert_allclose(em, [m for _, m in expected], rtol=1e-12)
    assert len(set(np.round(es, 6))) > 2  # the boosted suffixes give varied strengths


def boosted_table(tokenizer, split):
    """Bigram logits that favour every transition of the split's prompts and answers: a
    model that memorized the split."""
    table = random_table(len(tokenizer), 7) * 0.1  # the -inf pad column stays -inf
    for q, a in zip(split["question"], split["answer"]):
        ids = encode_qa(tokenizer, q, a, None)["input_ids"]
        for t in range(1, len(ids)):
            table[ids[t - 1], ids[t]] += 5.0
    return table


def test_membership_sign_on_a_model_that_memorized_the_forget_set(data, tokenizer):
    forget, holdout = data["forget"], data["holdout"]
    model = BigramLM(boosted_table(tokenizer, forget))
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        members = E.mia_scores(model, tokenizer, forget["answer"], attack, questions=forget["question"])
        nonmembers = E.mia_scores(model, tokenizer, holdout["answer"], attack, questions=holdout["question"])
        assert E.mia_auc(members, nonmembers) > 0.9, attack


def test_evaluate_tofu_reports_mia_privleak_and_memorization(data, tokenizer):
    small = datasets.DatasetDict({
        "forget": data["forget"], "retain": data["retain"].select(range(3)), "holdout": data["holdout"],
        "real_authors": data["real_authors"].select(range(2)), "world_facts": data["world_facts"].select(range(2)),
    })
    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=2)
    retain_model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=3)
    kw = dict(batch_size=4, max_new_tokens=3)
    retain_metrics = E.evaluate_tofu(retain_model, tokenizer, small, **kw)
    assert retain_metrics["privleak"] is None and "mia_reference" not in retain_metrics
    metrics = E.evaluate_tofu(model, tokenizer, small, retain_model_auc=retain_metrics["mia_min_k"],
                              reference_model=retain_model, **kw)
    f, h = small["forget"], small["holdout"]
    for attack in E.MIA_ATTACKS:
        ref = retain_model if attack == "reference" else None
        expected = E.mia_auc(E.mia_scores(model, tokenizer, f["answer"], attack, questions=f["question"],
                                          reference_model=ref),
                             E.mia_scores(model, tokenizer, h["answer"], attack, questions=h["question"],
                                          reference_model=ref))
        assert metrics[f"mia_{attack}"] == pytest.approx(expected, abs=1e-12), attack
    assert metrics["privleak"] == pytest.approx(E.privleak(metrics["mia_min_k"], retain_metrics["mia_min_k"]))
    assert metrics["extraction_strength"] == pytest.approx(
        E.extraction_strength(model, tokenizer, f["question"], f["answer"]).mean())
    assert metrics["exact_memorization"] == pytest.approx(
        E.exact_memorization(model, tokenizer, f["question"], f["answer"]).mean())

    summary = E.open_unlearning_summary(metrics)
    assert list(summary) == sorted(summary)
    assert "forget_quality" not in summary  # None: no retain truth ratios given
    expected_names = {"model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "privleak",
                      "extraction_strength", "exact_memorization", "mia_loss", "mia_zlib", "mia_min_k",
                      "mia_min_k_plus_plus", "mia_reference", "retain_Q_A_Prob", "retain_Q_A_ROUGE",
                      "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                      "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"}
    assert set(summary) == expected_names
    assert summary["forget_Q_A_ROUGE"] == metrics["forget_rouge"]
    assert summary["ra_Q_A_Prob_normalised"] == metrics["utility_components"]["real_authors_prob"]
    assert summary["retain_Truth_Ratio"] == metrics["utility_components"]["retain_truth_ratio"]
