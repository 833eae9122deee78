"""The losses of the open-unlearning methods against float64 formulas written here from
their papers, token by token, on tiny random batches with unlabelled positions and sizes
that are not powers of two; gradients by gradcheck where the loss is smooth, else against
the paper's closed form (the losses whose weights or targets carry no gradient)."""
import math
import warnings

import datasets
import pytest
import torch

from alter.data import collate, pad_id_of, qa_texts, tofu_mini
from alter.data.idk import IDK_ANSWERS
from alter.methods.ceu import ceu_loss
from alter.methods.data import encode_dataset, step_indices
from alter.methods.dpo import dpo_loss
from alter.methods.pdu import dual_update, pdu_forget_loss
from alter.methods.rmu import rmu_layer, rmu_loss, steering_vector
from alter.methods.satimp import satimp_loss
from alter.methods.simnpo import simnpo_loss
from alter.methods.undial import undial_loss
from alter.methods.wga import wga_loss
from alter.tiny import build_tokenizer, tiny_llama
from alter.training.loop import unlearn

B, L, V, D = 3, 7, 11, 5
TOL = dict(rtol=1e-6, atol=1e-6)


def batch(seed: int = 0):
    """float64 logits [B, L, V] and labels [B, L]: each row a prompt (-100), its answer,
    then padding (-100); row 2 has a one-token answer."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, L, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :2] = -100            # prompt of 2, answer of 5
    labels[1, :3] = -100            # prompt of 3, answer of 2, 2 padding
    labels[1, 5:] = -100
    labels[2, :5] = -100            # prompt of 5, answer of 1, 1 padding
    labels[2, 6:] = -100
    return logits, labels


def targets(labels):
    """(b, t, y): position t of row b predicts labelled token y = labels[b, t + 1]."""
    return [(b, t, int(labels[b, t + 1])) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
            if labels[b, t + 1] != -100]


def log_softmax(z):
    m = max(z)
    s = math.log(sum(math.exp(v - m) for v in z))
    return [v - m - s for v in z]


def logp_of(logits, b, t, y):
    return log_softmax(logits[b, t].tolist())[y]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), **TOL)


# ---------------------------------------------------------------- sequence-level losses


def test_simnpo_is_npo_on_the_length_normalized_nll_without_reference():
    logits, labels = batch()
    beta, delta = 4.5, 0.3
    terms = []
    for b in range(B):
        picked = [logp_of(logits, b2, t, y) for b2, t, y in targets(labels) if b2 == b]
        mean_nll = -sum(picked) / len(picked)
        terms.append(-2.0 / beta * log_sigmoid(beta * (mean_nll - delta)))
    close(simnpo_loss(logits, labels, beta, delta), sum(terms) / B)
    torch.autograd.gradcheck(lambda z: simnpo_loss(z, labels, beta, delta), logits.clone().requires_grad_())


def test_simnpo_lowers_as_the_forget_answers_become_unlikely():
    logits, labels = batch()
    for b, t, y in targets(labels):
        logits[b, t, y] -= 5.0
    assert simnpo_loss(logits, labels, 4.5, 0.0) < simnpo_loss(batch()[0], labels, 4.5, 0.0)


def test_dpo_prefers_the_alternate_answer_against_the_reference():
    g = torch.Generator().manual_seed(1)
    win, win_ref, lose, lose_ref = (-10 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.1
    expected = sum(-2.0 / beta * log_sigmoid(beta * ((win[i] - win_ref[i]) - (lose[i] - lose_ref[i])).item())
                   for i in range(B)) / B
    close(dpo_loss(win, win_ref, lose, lose_ref, beta), expected)
    torch.autograd.gradcheck(lambda w, lo: dpo_loss(w, win_ref, lo, lose_ref, beta),
                             (win.clone().requires_grad_(), lose.clone().requires_grad_()))


# ------------------------------------------------------------------- token-level losses


def reweighted_ascent_reference(logits, labels, weight):
    """-mean_t w(p_t) NLL_t over the n labelled targets, and its gradient in the logits with
    w held constant (the papers' weights carry no gradient): w(p_t) ([v = y_t] - p_tv) / n."""
    pairs = targets(labels)
    value, grad = 0.0, torch.zeros_like(logits)
    for b, t, y in pairs:
        logp = log_softmax(logits[b, t].tolist())
        p = [math.exp(v) for v in logp]
        w = weight(p[y])
        value += w * logp[y]                 # -(w * NLL) = w * log p
        for v in range(V):                   # d log p_y / dz_v = [v = y] - p_v
            grad[b, t, v] = w * ((v == y) - p[v])
    return value / len(pairs), grad / len(pairs)


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_wga_weights_each_token_nll_by_its_probability(beta):
    logits, labels = batch(2)
    expected, expected_grad = reweighted_ascent_reference(logits, labels, lambda p: p ** beta)
    z = logits.clone().requires_grad_()
    loss = wga_loss(z, labels, beta)
    close(loss, expected)
    loss.backward()
    torch.testing.assert_close(z.grad, expected_grad, **TOL)


def test_satimp_weights_by_saturation_times_importance():
    logits, labels = batch(3)
    beta1, beta2 = 5.0, 1.0
    expected, expected_grad = reweighted_ascent_reference(logits, labels, lambda p: p ** beta1 * (1 - p) ** beta2)
    z = logits.clone().requires_grad_()
    loss = satimp_loss(z, labels, beta1, beta2)
    close(loss, expected)
    loss.backward()
    torch.testing.assert_close(z.grad, expected_grad, **TOL)


def test_undial_distills_the_reference_with_the_target_logit_lowered():
    logits, labels = batch(4)
    ref = batch(5)[0]
    beta = 10.0
    pairs = targets(labels)
    total = 0.0
    for b, t, y in pairs:
        adjusted = ref[b, t].tolist()
        adjusted[y] -= beta
        q = [math.exp(v) for v in log_softmax(adjusted)]
        logp = log_softmax(logits[b, t].tolist())
        total += -sum(q[v] * logp[v] for v in range(V))
    close(undial_loss(logits, ref, labels, beta), total / len(pairs))
    torch.autograd.gradcheck(lambda z: undial_loss(z, ref, labels, beta), logits.clone().requires_grad_())


@pytest.mark.parametrize("ignore_first", [0, 1])
def test_ceu_is_cross_entropy_against_the_distribution_without_the_true_token(ignore_first):
    logits, labels = batch(6)
    labelled_seen = [0] * B
    value, grad, n = 0.0, torch.zeros_like(logits), 0
    for b, t, y in targets(labels):
        labelled_seen[b] += 1
        if labelled_seen[b] <= ignore_first:  # the first answer tokens of each row are left out
            continue
        z = logits[b, t].tolist()
        logp = log_softmax(z)
        others = log_softmax([v for i, v in enumerate(z) if i != y])
        q = others[:y] + [None] + others[y:]
        q = [0.0 if v is None else math.exp(v) for v in q]
        value += -sum(q[v] * logp[v] for v in range(V))
        for v in range(V):               # the paper's gradient: p - q, q held constant
            grad[b, t, v] = math.exp(logp[v]) - q[v]
        n += 1
    z = logits.clone().requires_grad_()
    loss = ceu_loss(z, labels, ignore_first)
    close(loss, value / n)
    loss.backward()
    torch.testing.assert_close(z.grad, grad / n, **TOL)


def test_pdu_flattens_the_logit_margin_at_the_positions_that_predict_the_answer():
    logits, labels = batch(7)
    pairs = targets(labels)
    total = 0.0
    for b, t, _ in pairs:
        z = logits[b, t].tolist()
        total += (max(z) - sum(z) / V) ** 2
    close(pdu_forget_loss(logits, labels), total / len(pairs))
    torch.autograd.gradcheck(lambda z: pdu_forget_loss(z, labels), logits.clone().requires_grad_())
    flat = torch.zeros_like(logits)
    assert pdu_forget_loss(flat, labels) == 0


def test_pdu_dual_update_is_projected_ascent_on_the_constraint():
    assert dual_update(1.0, 0.4, 5.0) == pytest.approx(3.0)
    assert dual_update(1.0, -0.4, 5.0) == 0.0  # projected onto lambda >= 0
    assert dual_update(1.0, -0.1, 1.0) == pytest.approx(0.9)


# ------------------------------------------------------------------------------- RMU


def test_rmu_is_the_per_sample_mean_squared_distance_over_labelled_tokens():
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    reference = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    mask = batch()[1] != -100
    control = steering_vector(D, 6.5, seed=3).double()
    for target in (control, reference):
        full = target.expand(B, L, D)
        per_sample = []
        for b in range(B):
            tokens = [t for t in range(L) if mask[b, t]]
            per_sample.append(sum(sum((hidden[b, t, d] - full[b, t, d]).item() ** 2 for d in range(D)) / D
                                  for t in tokens) / len(tokens))
        close(rmu_loss(hidden, target, mask), sum(per_sample) / B)
    torch.autograd.gradcheck(lambda h: rmu_loss(h, reference, mask), hidden.clone().requires_grad_())


def test_rmu_steering_vector_has_the_coefficient_as_norm_and_is_fixed_by_the_seed():
    u = steering_vector(13, 6.5, seed=4)
    assert u.shape == (13,) and u.dtype == torch.float32
    assert u.norm().item() == pytest.approx(6.5, rel=1e-6) and (u >= 0).all()
    assert torch.equal(u, steering_vector(13, 6.5, seed=4))
    assert not torch.equal(u, steering_vector(13, 6.5, seed=5))


@pytest.mark.parametrize("layers, expected", [(1, 0), (2, 0), (4, 1), (6, 2), (7, 3), (8, 7), (16, 7), (32, 7)])
def test_rmu_layer_is_open_unlearnings_7_or_the_same_depth_ratio(layers, expected):
    assert rmu_layer(layers) == expected


# ------------------------------------------------- the methods through the Python API

NEW_METHODS = ("simnpo", "dpo", "idk_dpo", "rmu", "undial", "ceu", "satimp", "wga", "pdu")


@pytest.fixture(scope="module")
def data():
    return tofu_mini(num_authors=4, facts_per_author=2, forget_fraction=0.5, seed=2)


@pytest.fixture(scope="module")
def tokenizer(data):
    return build_tokenizer(qa_texts(data) + list(IDK_ANSWERS))


def run(tokenizer, data, method, params="full", forget=None, retain=True, **run_args):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                       max_position_embeddings=128, seed=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    logs = []
    with warnings.catch_warnings():  # two steps forget little, as the run's report warns
        warnings.filterwarnings("ignore", "unlearn", UserWarning)
        unlearn(model, tokenizer, data["forget"] if forget is None else forget, data["retain"] if retain else None,
                method=method, params=params, batch_size=2, max_steps=2, router_warmup=0, progress=False,
                callback=lambda step, step_logs: logs.append(step_logs), **run_args)
    return model, before, logs


@pytest.mark.parametrize("params", ["full", "lora", "asym_lora"])
@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_method_runs_two_steps_on_each_parameterization(tokenizer, data, method, params):
    model, before, logs = run(tokenizer, data, method, params)
    assert len(logs) == 2 and all(math.isfinite(v) for step in logs for v in step.values())
    # a patched linear keeps its weight as base_layer.weight
    weights = {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}
    changed = [name for name, p in before.items() if not torch.equal(p, weights[name])]
    if params == "full":
        assert changed
    else:  # the base stays as it was; the adapters' B (zero at the start) trained
        assert not changed
        assert any(p.abs().sum() > 0 for name, p in weights.items() if name not in before and "lora_B" in name)


@pytest.mark.parametrize("method", ["dpo", "idk_dpo"])
@pytest.mark.parametrize("params", ["full", "asym_lora"])
def test_dpo_starts_at_log_2_scaled_the_policy_being_its_reference(tokenizer, data, method, params):
    """At the first step the trained model is the starting one: every log-ratio is 0."""
    _, _, logs = run(tokenizer, data, method, params)
    assert logs[0]["forget"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)


@pytest.mark.parametrize("params, checkpointing", [("full", False), ("lora", True)])
def test_rmu_retain_term_starts_at_zero_against_the_starting_model(tokenizer, data, params, checkpointing):
    """The steered layer's output is read by a hook, also when checkpointing recomputes it."""
    _, _, logs = run(tokenizer, data, "rmu", params, gradient_checkpointing=checkpointing)
    assert logs[0]["retain"] == pytest.approx(0.0, abs=1e-10) and logs[0]["forget"] > 0


def test_pdu_raises_the_retain_weight_by_the_constraint_violation(tokenizer, data):
    _, _, logs = run(tokenizer, data, "pdu", method_args={"dual_warmup_epochs": 0, "retain_loss_eps": 0.5,
                                                          "dual_step_size": 2.0})
    assert logs[0]["retain_weight"] == 1.0
    assert logs[1]["retain_weight"] == pytest.approx(1.0 + 2.0 * (logs[0]["retain"] - 0.5), rel=1e-5)
    # within the warm-up (5 epochs by default) the weight stays at alpha
    _, _, logs = run(tokenizer, data, "pdu", method_args={"alpha": 3.0})
    assert [step["retain_weight"] for step in logs] == [3.0, 3.0]


def test_methods_refuse_what_they_cannot_run_with_the_reason(tokenizer, data):
    with pytest.raises(ValueError, match="needs a 'alternate' column"):
        run(tokenizer, data, "dpo", method_args={"alternate_key": "alternate"})
    text = datasets.Dataset.from_dict({"text": ["Paris is a city ."]})
    with pytest.raises(ValueError, match="needs QA rows in the forget set"):
        run(tokenizer, data, "idk_dpo", forget=text)
    with pytest.raises(ValueError, match="layer 2 of a 2-layer model"):
        run(tokenizer, data, "rmu", method_args={"layer": 2})
    with pytest.raises(ValueError, match="needs a retain set"):
        run(tokenizer, data, "undial", retain=False, method_args={"alpha": 1.0})
    run(tokenizer, data, "undial", retain=False)  # its default (alpha 0) reads no retain set


FIRST_STEP_TERMS = {  # the forget term each method logs, from the starting model's logits of the first batch
    "simnpo": lambda logits, labels: simnpo_loss(logits, labels, 4.5, 0.0),
    "wga": lambda logits, labels: wga_loss(logits, labels, 1.0),
    "satimp": lambda logits, labels: satimp_loss(logits, labels, 5.0, 1.0),
    "undial": lambda logits, labels: undial_loss(logits, logits, labels, 10.0),  # the reference is the model
    "ceu": lambda logits, labels: ceu_loss(logits, labels, 1),
    "pdu": pdu_forget_loss,
}


@pytest.mark.parametrize("method", sorted(FIRST_STEP_TERMS))
def test_a_methods_first_step_logs_its_loss_on_its_first_batch_at_the_defaults(tokenizer, data, method):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                       max_position_embeddings=128, seed=3)
    examples = encode_dataset(tokenizer, data["forget"], "forget", None)
    forget_ids, _ = step_indices(0, len(examples), len(data["retain"]), 2, 0)
    batch = collate([examples[int(i)] for i in forget_ids], pad_id_of(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = FIRST_STEP_TERMS[method](logits.double(), batch["labels"])
    _, _, logs = run(tokenizer, data, method)
    assert logs[0]["forget"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
