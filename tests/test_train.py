"""The unlearning harness (alter.train): every method end to end on a tiny Llama, resume,
bad input, the k-means split, and the loss terms against float64 references."""
import copy
import dataclasses
import json
import math

import datasets
import numpy as np
import pytest
import torch

from alter.config import AlterConfig
from alter.data import qa_texts, tofu_mini
import alter.methods.params
import alter.train
from alter.model import adapter_parameters, alter_layers, apply_alter, forced_route, is_patched, router_loss
from alter.tiny import build_tokenizer, tiny_llama
from alter.train import (
    ADAPTER_METHODS,
    METHODS,
    finetune,
    method_class,
    npo_loss,
    sequence_logprob,
    split_subdomains,
    structural_exact,
    structural_surrogate,
    token_nll,
    unlearn,
)
from alter_kernels import inverted_hinge_loss, tsallis_entropy

# The per-token routers (routing "token"), which most tests here train; the sequence route,
# the default of an asym_lora run, has tests/test_sequence_route.py.
CONFIG = AlterConfig(r=4, num_experts=3, routing="token")


@pytest.fixture(scope="module")
def data():
    # 6 authors x 2 facts, 2 of them forgotten: 4 forget rows, 8 retain rows.
    return tofu_mini(num_authors=6, facts_per_author=2, forget_fraction=0.34, seed=1)


@pytest.fixture(scope="module")
def tokenizer(data):
    return build_tokenizer(qa_texts(data) + ["some corpus text about a forgotten author ."])


def small_model(tokenizer, **kwargs):
    """A 1-layer Llama (hidden 32): a handful of steps take well under a second."""
    args = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48, max_position_embeddings=64, seed=3)
    return tiny_llama(tokenizer, **{**args, **kwargs})


def run(model, tokenizer, data, method, callback=None, **kwargs):
    """The logs of each step of a short run; ``callback(step, logs)`` sees each too."""
    logs = []

    def record(step, log):
        logs.append(log)
        if callback is not None:
            callback(step, log)

    kwargs.setdefault("config", CONFIG)
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("router_warmup", 0)  # no warm-up unless asked: the run is its max_steps unlearning steps
    kwargs.setdefault("max_steps", 2)
    unlearn(model, tokenizer, data["forget"], data["retain"], method=method,
            progress=False, callback=record, **kwargs)
    return logs


def trainable_state(model):
    if is_patched(model):
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k or "router" in k}
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ----------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", METHODS)
def test_every_method_end_to_end(method, data, tokenizer):
    model = small_model(tokenizer)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    logs = run(model, tokenizer, data, method)
    assert len(logs) == 2
    assert all(type(v) is float and math.isfinite(v) for log in logs for v in log.values()), logs  # the callback contract
    # a method that reads no retain set (grad_ascent, undial at alpha 0, ceu) logs no retain term
    assert "forget" in logs[0] and ("retain" in logs[0]) == method_class(method).needs_retain
    if method in ADAPTER_METHODS:
        assert {"forget", "retain", "loss", "route"} <= set(logs[0])
    assert not model.training
    if method in ADAPTER_METHODS:
        assert is_patched(model)
        assert model.alter_tracker.forced_experts is None  # the trained router gates from now on
        assert model.alter_config.entropy_source == "lagged"  # generate() works
        groups = adapter_parameters(model)
        # B starts at zero and the router at zero: both must have moved.
        assert any(b.abs().sum() > 0 for b in groups["B"])
        assert any(p.abs().sum() > 0 for p in groups["router"])
        # The base weights are frozen.
        for name, p in model.named_parameters():
            if "base_layer" in name:
                assert torch.equal(p, before[name.replace(".base_layer", "")])
    else:
        assert any(not torch.equal(p, before[k]) for k, p in model.named_parameters())
    prompt = tokenizer(["Question: " + data["forget"][0]["question"] + "\nAnswer:"], return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4) or out[0, -1] == tokenizer.eos_token_id


def test_method_settings_reach_the_adapter(data, tokenizer):
    """Given a config that keeps A to the high-entropy tokens, alter keeps it; asym_lora and
    lora let A learn from every token; lora keeps one expert per token."""
    configs = {}
    guided = dataclasses.replace(CONFIG, a_learns_from_high_entropy_only=True)
    for method in ADAPTER_METHODS:
        model = small_model(tokenizer)
        run(model, tokenizer, data, method, config=guided)
        configs[method] = model.alter_config
    assert configs["alter"].a_learns_from_high_entropy_only
    assert not configs["asym_lora"].a_learns_from_high_entropy_only
    assert not configs["lora"].a_learns_from_high_entropy_only
    assert (configs["lora"].k_high, configs["lora"].k_low) == (1, 1)


def test_text_corpora(tokenizer):
    """Forget and retain sets with a text column (WMDP/MUSE corpora) train too."""
    forget = datasets.Dataset.from_dict({"text": ["some corpus text about a forgotten author ."] * 3})
    retain = datasets.Dataset.from_dict({"text": ["Question: Where was", "some corpus text ."]})
    model = small_model(tokenizer)
    logs = []
    unlearn(model, tokenizer, forget, retain, CONFIG, "alter", batch_size=2, max_steps=2, progress=False,
            callback=lambda step, log: logs.append(log))
    # max_steps=2 unlearning steps after as many router warm-up steps (sized to the capped run).
    assert len(logs) == 4 and (model.unlearn_report.router_warmup, model.unlearn_report.steps) == (2, 2)
    assert all(math.isfinite(v) for log in logs for v in log.values())


def test_structural_exact_runs_and_restores_attention(data, tokenizer):
    model = small_model(tokenizer)
    attention = model.config._attn_implementation
    # threshold 0.5: a random model is high-entropy everywhere, so H is not empty.
    config = AlterConfig(r=4, num_experts=3, entropy_threshold=0.5, lam=1.0)
    one_row = {split: data[split].select([0]) for split in ("forget", "retain")}  # a double backward per token
    logs = run(model, tokenizer, one_row, "alter", config=config, structural="exact", batch_size=1)
    assert logs[0]["structural"] == 0.0  # B = 0 at the first step: S_q does not depend on A
    assert logs[1]["structural"] > 0.0 and math.isfinite(logs[1]["structural"])
    assert model.config._attn_implementation == attention


def test_router_warmup_trains_only_the_routers(data, tokenizer):
    model = small_model(tokenizer)
    initial = small_model(tokenizer)
    after_warmup = {}

    def snapshot(step, logs):  # the adapters after the 2 warm-up steps, before the unlearning step
        if step == 2:
            after_warmup.update({name: [p.detach().clone() for p in group]
                                 for name, group in adapter_parameters(model).items()})
            after_warmup["A"] = {name: layer.lora_A.detach().clone() for name, layer in alter_layers(model).items()}

    logs = run(model, tokenizer, data, "alter", router_warmup=2, max_steps=1, callback=snapshot)
    assert len(logs) == 3 and model.unlearn_report.steps == 1 and model.unlearn_report.router_warmup == 2
    assert set(logs[0]) == set(logs[1]) == {"route"} and logs[1]["route"] < logs[0]["route"]
    assert "forget" in logs[2]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in after_warmup["B"])
    assert any(p.abs().sum() > 0 for p in after_warmup["router"])
    torch.manual_seed(0)  # unlearn(seed=0) initializes the adapters after seeding
    apply_alter(initial, model.alter_config)
    for name, layer in alter_layers(initial).items():
        assert torch.equal(after_warmup["A"][name], layer.lora_A)
    with pytest.raises(ValueError, match="router_warmup is for the adapter methods"):
        run(small_model(tokenizer), tokenizer, data, "grad_diff", router_warmup=1)


def test_forget_routing_loss_counts_only_the_routing_targets(data, tokenizer, monkeypatch):
    """The forget pass teaches the router on the positions mark_routing_targets chose (a
    proper subset: not the shared question template); the retain pass on every token."""
    seen = []

    def recording_router_loss(model, token_mask=None):
        seen.append(token_mask)
        return router_loss(model, token_mask)

    monkeypatch.setattr(alter.methods.params, "router_loss", recording_router_loss)
    run(small_model(tokenizer), tokenizer, data, "alter", router_warmup=1, max_steps=1)  # warm-up, then a step
    assert len(seen) == 4  # forget and retain pass of each step
    for forget_mask, retain_mask in (seen[0:2], seen[2:4]):
        assert forget_mask.dtype == torch.bool and 0 < int(forget_mask.sum()) < forget_mask.numel()
        assert retain_mask.dtype == torch.bool and int(retain_mask.sum()) > 0


def test_router_loss_token_mask_against_float64():
    """router_loss(model, token_mask): per-layer cross-entropy over the masked,
    non-padding tokens, then the mean over layers."""
    config = AlterConfig(r=4, num_experts=3)
    model = apply_alter(tiny_llama(37, hidden_size=24, num_layers=1, num_heads=2, intermediate_size=40, seed=5), config)
    torch.manual_seed(1)
    for layer in alter_layers(model).values():  # fresh routers are zero: give them logits to check
        torch.nn.init.normal_(layer.router.weight, std=0.5)
        torch.nn.init.normal_(layer.router.entropy_weight, std=0.5)
    inputs = {}
    for name, layer in alter_layers(model).items():
        layer.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0]))
    ids = torch.randint(0, 37, (2, 9))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # padding never counts
    token_mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(2)) > 0.4
    experts = torch.tensor([2, 1])
    with forced_route(model, experts):
        model(input_ids=ids, attention_mask=attention)
        loss = router_loss(model, token_mask)
        with pytest.raises(ValueError, match="token_mask has 9 tokens"):
            router_loss(model, token_mask[0])
    entropy = model.alter_tracker.last_call.entropy.reshape(-1).double()
    keep = (token_mask & attention.bool()).reshape(-1)
    targets = experts.repeat_interleave(9)[keep]
    expected = []
    for name, layer in alter_layers(model).items():
        x = inputs[name].reshape(-1, layer.in_features).double()
        logits = x @ layer.router.weight.double().t() + entropy[:, None] * layer.router.entropy_weight.double()
        expected.append(torch.nn.functional.cross_entropy(logits[keep], targets))
    # float32 logits against float64: a few ulps of a sum of ~10 terms of order 1.
    torch.testing.assert_close(loss.double(), torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_routing_pass_gates_like_inference_and_trains_only_the_routers(data, tokenizer):
    """forced_route(gate=False): the model computes what it computes without a forced
    route (the routers gate), while router_loss still has its targets."""
    model = apply_alter(small_model(tokenizer), CONFIG)
    torch.manual_seed(4)
    for layer in alter_layers(model).values():  # non-zero experts and routers: routes matter
        torch.nn.init.normal_(layer.lora_B, std=0.5)
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    model.eval()
    ids = torch.randint(0, len(tokenizer), (2, 6))
    with torch.no_grad():
        gated = model(input_ids=ids).logits
        with forced_route(model, [1, 2], gate=False):
            targets_only = model(input_ids=ids).logits
            assert router_loss(model).item() > 0
        with forced_route(model, [1, 2]):
            forced = model(input_ids=ids).logits
    # float32 tolerance: without a forced route a no-grad call runs the fused gated_asym_lora op
    torch.testing.assert_close(targets_only, gated)
    assert not torch.allclose(forced, gated)  # a forced route is another function
    with pytest.raises(TypeError, match="gate must be a bool"):
        with forced_route(model, [1, 2], gate="no"):
            pass

    model = small_model(tokenizer)
    logs = run(model, tokenizer, data, "alter", router_warmup=1, max_steps=1)  # a warm-up step, then a training step
    assert set(logs[0]) == {"route"} and {"forget", "retain", "route", "loss"} <= set(logs[1])
    # The routing passes freeze A and B while they run and hand them back trainable.
    assert all(p.requires_grad for group in adapter_parameters(model).values() for p in group)


def test_router_lr_sets_the_router_group_and_is_validated(data, tokenizer, monkeypatch):
    optimizers = []
    original = torch.optim.AdamW

    def recording_adamw(*args, **kwargs):
        optimizers.append(original(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    model = small_model(tokenizer)
    run(model, tokenizer, data, "alter", router_lr=0.25)
    groups = adapter_parameters(model)
    lr_of = {id(p): group["lr"] for group in optimizers[0].param_groups for p in group["params"]}
    assert {lr_of[id(p)] for p in groups["router"]} == {0.25}
    assert {lr_of[id(p)] for p in groups["B"]} == {CONFIG.lr_B}
    assert {lr_of[id(p)] for p in groups["A"]} == {CONFIG.lr_A}
    with pytest.raises(ValueError, match="router_lr must be a positive number"):
        run(small_model(tokenizer), tokenizer, data, "alter", router_lr=0.0)
    with pytest.raises(ValueError, match="router_lr is for the adapter methods"):
        run(small_model(tokenizer), tokenizer, data, "npo", router_lr=1e-2)


def test_mixed_precision_and_gradient_checkpointing_on_cpu(data, tokenizer):
    """The GPU defaults (bf16 autocast, checkpointing with backward inside the routing
    context) run on the CPU too."""
    model = small_model(tokenizer)
    logs = run(model, tokenizer, data, "alter", mixed_precision=True, gradient_checkpointing=True)
    assert all(math.isfinite(v) for log in logs for v in log.values()), logs
    assert not model.is_activation_checkpointing  # switched off again afterwards
    assert any(b.abs().sum() > 0 for b in adapter_parameters(model)["B"])


def test_same_seed_same_result(data, tokenizer):
    results = []
    for _ in range(2):
        model = small_model(tokenizer)
        run(model, tokenizer, data, "alter")
        results.append(trainable_state(model))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


# ---------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", ["alter", "grad_diff"])
def test_resume_matches_uninterrupted_run(method, data, tokenizer, tmp_path):
    # Dropout on, so that the RNG state must be restored too.
    config = AlterConfig(r=4, num_experts=3, dropout=0.1)
    common = dict(config=config, method=method, batch_size=2, epochs=2, progress=False, lr=1e-3, router_warmup=0)

    full = small_model(tokenizer)
    unlearn(full, tokenizer, data["forget"], data["retain"], **common)

    stopped = small_model(tokenizer)
    unlearn(stopped, tokenizer, data["forget"], data["retain"], max_steps=3, output_dir=str(tmp_path),
            save_every=3, **common)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = small_model(tokenizer)  # a fresh process would start from the base model again
    steps = []
    unlearn(resumed, tokenizer, data["forget"], data["retain"], output_dir=str(tmp_path), resume=True,
            callback=lambda step, log: steps.append(step), **common)
    assert steps == [4]  # 4 forget rows / batch 2 x 2 epochs = 4 steps, 3 already done

    want, got = trainable_state(full), trainable_state(resumed)
    assert want.keys() == got.keys()
    for key in want:
        # Same ops in the same order on the CPU: bitwise equal.
        assert torch.equal(want[key], got[key]), key


def test_resume_refuses_another_run(data, tokenizer, tmp_path):
    model = small_model(tokenizer)
    run(model, tokenizer, data, "alter", output_dir=str(tmp_path), save_every=1)
    with pytest.raises(ValueError, match="different run"):
        run(small_model(tokenizer), tokenizer, data, "asym_lora", output_dir=str(tmp_path), resume=True)
    # Another adapter shape (or any other setting) is the same refusal, not a shape error from copy_.
    other = dataclasses.replace(CONFIG, r=CONFIG.r + 1)
    with pytest.raises(ValueError, match="different run"):
        run(small_model(tokenizer), tokenizer, data, "alter", config=other, output_dir=str(tmp_path), resume=True)


def test_output_dir_holds_a_loadable_adapter(data, tokenizer, tmp_path):
    from alter.model import load_adapter

    model = small_model(tokenizer)
    run(model, tokenizer, data, "alter", output_dir=str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "unlearn_args.json").exists()
    loaded = load_adapter(small_model(tokenizer), str(tmp_path))
    for name, layer in alter_layers(model).items():
        assert torch.equal(layer.lora_B, alter_layers(loaded)[name].lora_B)


# ------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(data, tokenizer):
    model = small_model(tokenizer)
    forget, retain = data["forget"], data["retain"]

    def call(**kwargs):
        args = dict(forget=forget, retain=retain, config=CONFIG, method="alter", progress=False)
        unlearn(model, tokenizer, **{**args, **kwargs})

    with pytest.raises(ValueError, match="'question' and 'answer' columns .* or a 'text' column"):
        call(forget=forget.remove_columns("answer"))
    with pytest.raises(ValueError, match="retain is empty"):
        call(retain=retain.select([]))
    with pytest.raises(TypeError, match="forget must be a datasets.Dataset"):
        call(forget=[{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="method must be one of"):
        call(method="magic")
    with pytest.raises(ValueError, match="needs a retain set"):
        call(retain=None)
    with pytest.raises(TypeError, match="config must be an AlterConfig"):
        call(config={"r": 4})
    with pytest.raises(ValueError, match="structural must be one of"):
        call(structural="approximate")
    with pytest.raises(ValueError, match="structural='exact' needs the eager backend"):
        call(config=AlterConfig(r=4, num_experts=3, backend="triton"), structural="exact")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        call(batch_size=0)
    with pytest.raises(ValueError, match="save_every needs output_dir"):
        call(save_every=1)
    long_answer = " ".join(["Lisbon"] * 80)  # 64-token context
    too_long = datasets.Dataset.from_list([{"question": "Where was it?", "answer": long_answer}] + list(forget))
    with pytest.raises(ValueError, match=r"forget\[0\]: .*more than max_length=64"):
        call(forget=too_long)
    assert not is_patched(model)  # nothing was done to the model


# -------------------------------------------------------------------------- k-means


def test_split_subdomains_is_deterministic_and_finds_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 7)) * 20
    truth = np.repeat(np.arange(3), [5, 6, 4])
    features = centers[truth] + rng.normal(size=(15, 7))
    labels = split_subdomains(features, 3, seed=5)
    assert np.array_equal(labels, split_subdomains(features, 3, seed=5))
    assert labels.dtype == np.int64 and set(labels) == {0, 1, 2}
    # The same partition as the true blobs (up to renaming the clusters).
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 3
    assert np.array_equal(split_subdomains(features, 1), np.zeros(15, dtype=np.int64))
    assert np.array_equal(np.sort(split_subdomains(features[:2], 3)), np.array([0, 1]))
    # Duplicates (e.g. a repeated text) are one sub-domain; no k-means on too few points.
    assert len(set(split_subdomains(features[[0, 0, 0, 1]], 3).tolist())) == 2
    with pytest.raises(ValueError, match="features must be a non-empty"):
        split_subdomains(np.zeros((0, 3)), 2)


def test_split_subdomains_on_noise_depends_only_on_the_seed():
    features = np.random.default_rng(1).normal(size=(23, 5))
    assert np.array_equal(split_subdomains(features, 4, seed=9), split_subdomains(features.copy(), 4, seed=9))


# --------------------------------------------------------------------------- losses


def _random_batch(B=3, L=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    return logits, labels


def test_token_nll_and_sequence_logprob_against_float64():
    logits, labels = _random_batch()
    logits_nc = logits.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous, same values
    nll, count, per_seq = 0.0, 0, torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for t in range(6):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            lp = logits[b, t, y] - torch.logsumexp(logits[b, t], 0)
            nll -= float(lp)
            count += 1
            per_seq[b] += lp
    # float32 cross-entropy inside: 1e-5 relative.
    assert token_nll(logits_nc, labels).item() == pytest.approx(nll / count, rel=1e-5)
    torch.testing.assert_close(sequence_logprob(logits_nc, labels).double(), per_seq, rtol=1e-5, atol=1e-5)


def test_shift_keeps_the_logits_a_view_and_pairs_each_position_with_the_next_label():
    """The forget and retain losses read the logits without a [T, V] copy; the IHL over
    the shifted pairs is the mean over labelled tokens of 1 + p_y - max_{v != y} p_v."""
    logits, labels = _random_batch()
    flat_logits, flat_labels = alter.train.shift_labels(logits, labels)
    assert flat_logits.data_ptr() == logits.data_ptr() and flat_logits._is_view()
    B, L, V = logits.shape
    expected = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], dim=1).reshape(-1)
    assert torch.equal(flat_labels, expected)
    p = torch.softmax(logits, -1)
    hinge = []
    for b in range(B):
        for t in range(L - 1):
            y = int(labels[b, t + 1])
            if y != -100:
                others = torch.cat([p[b, t, :y], p[b, t, y + 1 :]])
                hinge.append(1 + p[b, t, y] - others.max())
    loss, _ = inverted_hinge_loss(flat_logits.float(), flat_labels, 1.2, 1.0, high_entropy_weight=1.0, backend="eager")
    # float32 softmax against the float64 loop: 1e-5 relative.
    assert loss.item() == pytest.approx(torch.stack(hinge).mean().item(), rel=1e-5)


def test_npo_loss_formula():
    logprob = torch.tensor([-3.0, -1.5, -7.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -2.5, -1.0], dtype=torch.float64)
    beta = 0.3
    want = np.mean([-(2 / beta) * math.log(1 / (1 + math.exp(beta * (a - b)))) for a, b in zip(logprob, ref)])
    assert npo_loss(logprob, ref, beta).item() == pytest.approx(want, rel=1e-12)


def test_structural_surrogate_against_float64():
    logits, _ = _random_batch(V=13)
    q, threshold = 1.2, 1.0
    base = torch.rand(3, 7, dtype=torch.float64) * 2
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"entropy": base.float(), "attention_mask": mask}
    p = torch.softmax(logits, -1)
    adapted = (1 - (p ** q).sum(-1)) / (q - 1)
    high = (base.float() > threshold) & mask.bool()
    want = ((adapted - base.float().double()) ** 2)[high].mean()
    # float32 entropy kernel vs float64 formula: 1e-5 relative.
    assert structural_surrogate(logits.float(), batch, q, threshold).item() == pytest.approx(want.item(), rel=1e-5)
    batch["entropy"] = torch.zeros(3, 7)
    assert structural_surrogate(logits.float(), batch, q, threshold).item() == 0.0


def test_structural_exact_against_jacobian():
    """E_H ||d S_q(x_t) / dA||^2 of a toy linear 'model' logits = x (W + B A)^T, against
    torch.autograd.functional.jacobian in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    W = torch.randn(9, 6, generator=g, dtype=torch.float64)
    B = torch.randn(9, 3, generator=g, dtype=torch.float64)
    A = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    q, threshold = 0.8, 1.0
    entropy = torch.rand(2, 5, generator=g) * 2
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 4] = 0
    batch = {"entropy": entropy, "attention_mask": mask}

    def token_entropies(a):
        return tsallis_entropy(x @ (W + B @ a).T, q, backend="eager")

    jac = torch.autograd.functional.jacobian(token_entropies, A.detach())  # [2, 5, 3, 6]
    high = (entropy > threshold) & mask.bool()
    want = (jac ** 2).sum((-1, -2))[high].mean()
    got = structural_exact(x @ (W + B @ A).T, batch, q, threshold, [A])
    # Same float64 math by two routes: 1e-10 relative.
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    got.backward()  # double backward reaches A
    assert A.grad is not None and A.grad.abs().sum() > 0


# ---------------------------------------------------------------------- memorization


def test_finetune_learns_the_facts(data, tokenizer):
    from alter.eval import answer_probability

    model = small_model(tokenizer)
    facts = data["retain"].select(range(4))
    before = answer_probability(model, tokenizer, facts["question"], facts["answer"]).mean()
    finetune(model, tokenizer, facts, epochs=40, batch_size=4, lr=1e-2, progress=False)
    after = answer_probability(model, tokenizer, facts["question"], facts["answer"]).mean()
    assert after > 0.5 > before


# ------------------------------------------------------------- routing targets, run length, report


def _examples(rows):
    return [{"input_ids": list(ids)} for ids in rows]


def test_routing_targets_start_where_the_prefix_leaves_every_retained_example():
    """A forget position is a target iff the tokens up to it prefix no retained example
    (BOS, shared templates are not); every retained position is a target."""
    retain = _examples([[1, 5, 6, 7, 8], [1, 5, 9, 3]])
    forget = _examples([[1, 5, 6, 4, 8], [1, 2, 6, 7], [1, 5, 9, 3, 3]])
    alter.train.mark_routing_targets(forget, retain)
    assert [e["route_mask"] for e in forget] == [[0, 0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert [e["route_mask"] for e in retain] == [[1] * 5, [1] * 4]


def test_run_length_is_sized_from_the_data():
    from alter.train import MAX_DEFAULT_STEPS, MAX_ROUTER_WARMUP, MIN_STEPS, run_length

    assert run_length(10, 4, None, None, True) == (MIN_STEPS, MIN_STEPS)  # 3 batches an epoch
    assert run_length(1000, 4, None, None, True) == (MAX_ROUTER_WARMUP, MAX_DEFAULT_STEPS)
    assert run_length(8000, 4, None, None, True) == (MAX_ROUTER_WARMUP, 2000)  # at least one epoch
    assert run_length(120, 4, None, None, True) == (MAX_ROUTER_WARMUP, min(300, MAX_DEFAULT_STEPS))
    assert run_length(10, 4, 2, None, True) == (6, 6)  # explicit epochs: 2 x 3 batches
    assert run_length(10, 4, None, 7, True)[0] == 7
    assert run_length(10, 4, None, None, False)[0] == 0  # no router, no warm-up


def test_bigram_surprisal_weighs_template_words_zero_and_values_by_their_spread():
    """-log2 p(token | previous) over the labelled tokens of the corpus: 5 always follows
    4 (0 bits), 4 is followed by 5 always; 7, 8 and 9 share the context 6 (log2 3 bits)."""
    from alter.train import bigram_surprisal

    forget = [{"input_ids": [1, 4, 5, 6, 7], "labels": [-100, -100, 5, 6, 7]}]
    retain = [{"input_ids": [1, 4, 5, 6, 8], "labels": [-100, 4, 5, 6, 8]},
              {"input_ids": [2, 6, 9], "labels": [-100, -100, 9]}]
    got = bigram_surprisal(forget, forget + retain)
    # forget's labelled tokens: 5 after 4, 6 after 5, 7 after 6
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, math.log2(3)], dtype=torch.float64))


def test_kept_share_counts_the_start_predictions_still_made_with_their_weights():
    from alter.train import LabelScores

    start = LabelScores(0.9, torch.tensor([True, True, True, False]))
    now = LabelScores(0.5, torch.tensor([True, False, False, True]))
    assert now.kept_share(start) == pytest.approx(1 / 3)  # a token newly predicted does not count
    assert now.kept_share(start, torch.tensor([3.0, 1.0, 0.0, 5.0], dtype=torch.float64)) == pytest.approx(3 / 4)
    assert now.kept_share(LabelScores(0.0, torch.zeros(4, dtype=torch.bool))) == 1.0  # nothing to forget


@pytest.fixture(scope="module")
def memorized(data, tokenizer):
    """A small model trained on forget + retain: it predicts its forget answers, so there
    is something for the early stop to measure."""
    model = small_model(tokenizer)
    finetune(model, tokenizer, datasets.concatenate_datasets([data["forget"], data["retain"]]), epochs=40,
             batch_size=4, lr=1e-2, progress=False)
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")  # "barely forgotten" is not what this test checks
@pytest.mark.parametrize("method", ["alter", "grad_diff"])
def test_early_stop_ends_the_run_at_the_first_check_below_the_share(method, memorized, data, tokenizer, tmp_path):
    """With a share the start already meets (0.99 after a few large steps) the run stops at
    the first check, one pass over the forget set after the warm-up; with None it runs
    every step. The report records each check."""
    settings = dict(method=method, batch_size=2, progress=False, max_steps=12, seed=0,
                    **({"config": dataclasses.replace(CONFIG, lr_B=5e-2, lr_A=5e-2), "router_warmup": 2}
                       if method == "alter" else {"lr": 5e-2}))
    warmup = settings.get("router_warmup", 0)
    check_every = math.ceil(len(data["forget"]) / 2)
    model = copy.deepcopy(memorized)
    unlearn(model, tokenizer, data["forget"], data["retain"], early_stop_share=0.99, output_dir=str(tmp_path),
            **settings)
    report = model.unlearn_report
    assert report.stopped_early and report.forget_kept_history[-1][1] <= 0.99
    assert report.forget_kept_share == report.forget_kept_history[-1][1]  # the stop's scores, not a new pass
    # Checks and max_steps count unlearning steps, the warm-up apart.
    assert report.router_warmup == warmup
    assert [step for step, _ in report.forget_kept_history] == list(range(check_every, report.steps + 1, check_every))
    assert report.steps % check_every == 0 and report.steps < 12
    assert f"ended: early stop at unlearning step {report.steps}:" in str(report)
    assert report.verdict != "not forgotten" and "barely" not in str(report)
    record = json.loads((tmp_path / "unlearn_args.json").read_text())
    assert (record["steps"], record["stopped_early"]) == (report.steps, True)
    model = copy.deepcopy(memorized)
    unlearn(model, tokenizer, data["forget"], data["retain"], early_stop_share=None, **settings)
    assert model.unlearn_report.steps == 12 and not model.unlearn_report.stopped_early
    assert model.unlearn_report.forget_kept_history == []
    assert "ended: step cap: max_steps 12" in str(model.unlearn_report)


def test_a_run_ending_short_of_the_early_stop_says_so(memorized, data, tokenizer):
    with pytest.warns(UserWarning, match="above early_stop_share 0.0: more epochs would forget more"):
        unlearn(copy.deepcopy(memorized), tokenizer, data["forget"], data["retain"], early_stop_share=0.0, epochs=2,
                config=dataclasses.replace(CONFIG, lr_B=5e-2, lr_A=5e-2), router_warmup=2, batch_size=2,
                progress=False)


@pytest.mark.parametrize("share", [-0.1, 1.0, True, "0.3", float("nan")])
def test_early_stop_share_is_validated(share, data, tokenizer):
    with pytest.raises(ValueError, match="early_stop_share"):
        unlearn(small_model(tokenizer), tokenizer, data["forget"], data["retain"], early_stop_share=share,
                progress=False)


def test_run_report_and_forgetting_warning(data, tokenizer, capsys):
    model = small_model(tokenizer)
    with pytest.warns(UserWarning, match="is not forgotten"):  # 2 steps forget nothing
        run(model, tokenizer, data, "alter", router_warmup=1)
    report = model.unlearn_report
    assert (report.method, report.steps, report.router_warmup) == ("alter", 2, 1)
    # kept: the retain NLL of the forget rows' predictable tokens (forget_tokens "unpredictable")
    assert set(report.losses) == {"route", "forget", "retain", "structural", "kept", "loss"}
    assert report.losses["route"]["min"] <= min(report.losses["route"]["first"], report.losses["route"]["last"])
    assert 0.0 <= report.forget_routing_share <= 1.0 and 0.0 <= report.retain_leak_share <= 1.0
    assert 0.0 < report.forget_probability_before <= 1.0
    assert "routing: forget tokens -> forget experts" in str(report)
    assert capsys.readouterr().out == ""  # progress=False: not printed
    model = small_model(tokenizer)
    run(model, tokenizer, data, "grad_diff", lr=1e-3)
    assert model.unlearn_report.forget_routing_share is None and "forget" in model.unlearn_report.losses


def test_routing_shares_against_a_direct_count(data, tokenizer):
    """routing_shares: the mean over layers and marked positions of the routing weight on
    experts >= 1, recomputed here from each router's logits with route()."""
    from alter.data import pad_id_of
    from alter.train import base_model_pass, encode_dataset, routing_shares
    from alter_kernels import route

    model = small_model(tokenizer)
    examples = encode_dataset(tokenizer, data["forget"], "forget", None)
    _, entropy = base_model_pass(model, examples, pad_id_of(tokenizer), CONFIG.tsallis_q, 4)
    for example, values in zip(examples, entropy):
        example["entropy"] = values
    apply_alter(model, CONFIG)
    torch.manual_seed(2)
    for layer in alter_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    for example in examples:
        example["route_mask"] = [int(i % 2 == 0) for i in range(len(example["input_ids"]))]
    got = routing_shares(model, examples, pad_id_of(tokenizer), 3)
    total = count = 0.0
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        entropy = example["entropy"][None]
        inputs = {}
        hooks = [layer.router.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, (o, i[1])))
                 for name, layer in alter_layers(model).items()]
        from alter.model import precomputed_entropy
        with torch.no_grad(), precomputed_entropy(model, entropy):
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        per_layer = []
        for logits, ent in inputs.values():
            w, e = route(logits, ent, CONFIG.entropy_threshold, CONFIG.tau_high, CONFIG.tau_low, CONFIG.k_high,
                         CONFIG.k_low, backend="eager")
            per_layer.append((w * (e > 0)).sum(-1).double())
        share = torch.stack(per_layer).mean(0)
        mask = torch.tensor(example["route_mask"], dtype=torch.bool)
        total += float(share[mask].sum())
        count += float(mask.sum())
    assert 0.0 < got < 1.0
    assert got == pytest.approx(total / count, rel=1e-5)


def test_paper_preset_and_router_training_routes(data, tokenizer, monkeypatch):
    """AlterConfig.paper() trains under forced routes; the default under the routers' own
    gating, where the forget loss never reaches the retention expert B_0."""
    paper = AlterConfig.paper()
    assert (paper.lr_A, paper.lr_B, paper.train_routes, paper.beta, paper.gamma, paper.lam) == (
        1e-5, 1e-3, "forced", 1.0, 1.0, 0.01)
    assert paper.a_learns_from_high_entropy_only and not AlterConfig().a_learns_from_high_entropy_only
    assert AlterConfig.paper(r=4).r == 4
    gates = []
    original = alter.methods.params.forced_route

    def recording_forced_route(model, experts, gate=True):
        gates.append(gate)
        return original(model, experts, gate)

    monkeypatch.setattr(alter.methods.params, "forced_route", recording_forced_route)
    for config, want in ((AlterConfig.paper(r=4, num_experts=3), True), (CONFIG, False)):
        gates.clear()
        model = small_model(tokenizer)
        unlearn(model, tokenizer, data["forget"], data["retain"], config=config, batch_size=2, max_steps=1,
                router_warmup=0, progress=False)
        assert gates[:2] == [want, want]  # the forget and the retain pass of the step
    # Under router routes, B_0 gets no gradient from the forget loss: a forget-only run
    # (gamma 0, no structural term) leaves it at zero. Threshold ~0: every token is high
    # entropy, so the fresh routers mix all experts (and IHL weighs every token).
    model = small_model(tokenizer)
    config = dataclasses.replace(CONFIG, gamma=0.0, lam=0.0, entropy_threshold=1e-6, high_entropy_weight=1.0)
    unlearn(model, tokenizer, data["forget"], data["retain"], config=config, batch_size=2, max_steps=2,
            router_warmup=0, progress=False)
    for layer in alter_layers(model).values():
        assert torch.equal(layer.lora_B[0], torch.zeros_like(layer.lora_B[0]))
    assert any(layer.lora_B[1:].abs().sum() > 0 for layer in alter_layers(model).values())
