"""The parameterization as its own choice (issue 20): every (method, params) pair from the
CLI, refusals with their reason, the method_args and params checks, lora under gradient
checkpointing (open-unlearning #178), and the full-parameter learning rate."""
import json
import warnings

import pytest
import torch

from alter.adapters import adapter_parameters, is_patched
from alter.cli import main
from alter.config import AlterConfig
from alter.methods import method_class, method_names
from alter.methods.params import PARAMS
from alter.training.args import UnlearnArgs
from alter.training.loop import unlearn
from conftest import small_model  # with the data and tokenizer fixtures of conftest

PAIRS = [(method, params) for method in method_names() for params in PARAMS]


@pytest.fixture(scope="module")
def cli_inputs(data, tokenizer, tmp_path_factory):
    """A saved tiny model and forget/retain JSON lines files (with TOFU's perturbed answers:
    dpo's preferred answers)."""
    root = tmp_path_factory.mktemp("params_cli")
    small_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    files = []
    for split in ("forget", "retain"):
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps({k: r[k] for k in ("question", "answer", "perturbed_answer")}) + "\n"
                                for r in data[split]))
        files.append(str(path))
    return str(root / "model"), *files


@pytest.mark.parametrize("method, params", PAIRS)
def test_every_method_params_pair_runs_from_the_cli_or_is_refused(method, params, cli_inputs, tmp_path, capsys):
    model, forget, retain = cli_inputs
    out = tmp_path / "out"
    argv = ["unlearn", "--model", model, "--forget", forget, "--retain", retain, "--out", str(out), "--quiet",
            "--method", method, "--params", params, "--max-steps", "2", "--batch-size", "2", "--router-warmup", "0",
            "--rank", "2", "--num-experts", "3", "--device", "cpu"]
    cls = method_class(method)
    if params not in cls.supported_params:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2
        assert f"method {method!r} does not run on params={params!r}: " in err and len(err) > 80, err
        assert not out.exists()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two steps barely forget
        assert main(argv) == 0
    record = json.loads((out / "unlearn_args.json").read_text())
    assert (record["method"], record["params"], record["steps"]) == (method, params, 2)
    adapter = (out / "adapter_config.json").exists()
    assert adapter == (params != "full") and (out / "model.safetensors").exists() == (params == "full")


def test_cli_method_args_reach_the_method_and_unknown_keys_are_refused(cli_inputs, tmp_path, capsys):
    model, forget, retain = cli_inputs
    argv = ["unlearn", "--model", model, "--forget", forget, "--retain", retain, "--out", str(tmp_path / "o"),
            "--quiet", "--method", "npo", "--max-steps", "1", "--batch-size", "2", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv + ["--method-arg", "beta=0.3", "--method-arg", "alpha=2"]) == 0
    record = json.loads((tmp_path / "o" / "unlearn_args.json").read_text())
    assert record["method_args"] == {"beta": 0.3, "alpha": 2} and record["params"] is None
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--method-arg", "temperature=2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "method 'npo' has no method_args ['temperature']; its hyper-parameters: alpha, beta, gamma" in err


def test_params_and_method_args_are_checked_at_the_boundary():
    with pytest.raises(ValueError, match=r"params must be one of \('full', 'lora', 'asym_lora'\) or None"):
        UnlearnArgs(method="grad_diff", params="qlora")
    with pytest.raises(ValueError, match="method 'alter' does not run on params='full': ALTER is an AsymLoRA method"):
        UnlearnArgs(method="alter", params="full")
    with pytest.raises(ValueError, match="'lora' is grad_diff on params 'lora'; .* method='grad_diff', params='full'"):
        UnlearnArgs(method="lora", params="full")
    with pytest.raises(ValueError, match=r"method_args 'beta' of 'npo' must be a float \(default 0.1\), got 'x'"):
        UnlearnArgs(method="npo", method_args={"beta": "x"})
    with pytest.raises(ValueError, match=r"must be a float .* got True"):
        UnlearnArgs(method="npo", method_args={"beta": True})
    with pytest.raises(TypeError, match="method_args must be a dict, got list"):
        UnlearnArgs(method="npo", method_args=[("beta", 0.2)])
    with pytest.raises(ValueError, match="'grad_diff' takes its weights from method_args"):
        UnlearnArgs(method="grad_diff", config=AlterConfig(beta=0.5))
    with pytest.raises(ValueError, match=r"router_lr is for the adapter methods .* 'npo' on params 'full' has no router"):
        UnlearnArgs(method="npo", router_lr=1e-3)
    assert UnlearnArgs(method="npo", params="lora", router_lr=1e-3).router_lr == 1e-3
    # the method's default params, and its hyper-parameters over open-unlearning's defaults
    assert [method_class(m).resolve_params(None) for m in ("alter", "asym_lora", "lora", "grad_diff")] == [
        "asym_lora", "asym_lora", "lora", "full"]
    assert method_class("npo").method_hparams({"beta": 1}) == {"beta": 1.0, "alpha": 1.0, "gamma": 1.0}
    assert method_class("grad_diff").defaults == {"gamma": 1.0, "alpha": 1.0}


def test_npo_beta_is_a_deprecated_alias_of_method_args_beta():
    with pytest.warns(DeprecationWarning, match="npo_beta is deprecated"):
        args = UnlearnArgs(method="npo", npo_beta=0.3)
    assert args.method_args == {"beta": 0.3}
    with pytest.raises(ValueError, match="npo_beta=0.3 and method_args beta=0.2 disagree"), \
            pytest.warns(DeprecationWarning):
        UnlearnArgs(method="npo", npo_beta=0.3, method_args={"beta": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert UnlearnArgs(method="npo").method_args == {}  # the default: no warning


def test_a_method_needing_no_retain_set_reads_it_on_adapters(data, tokenizer):
    """grad_ascent runs without a retain set on full weights; on adapters the routers
    learn the retained data's route, so the run asks for it."""
    unlearn(small_model(tokenizer), tokenizer, data["forget"], None, method="grad_ascent", max_steps=1,
            batch_size=2, progress=False)
    with pytest.raises(ValueError, match="'grad_ascent' needs a retain set on params 'lora'"):
        unlearn(small_model(tokenizer), tokenizer, data["forget"], None, method="grad_ascent", params="lora",
                max_steps=1, batch_size=2, progress=False)


def _checkpointing(model) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name))


@pytest.mark.parametrize("reentrant", [False, True])
def test_lora_b_trains_under_gradient_checkpointing(reentrant, data, tokenizer):
    """open-unlearning #178: under checkpointing with a frozen base, the inputs of a
    checkpointed block need not require grad; reentrant checkpointing then gives the
    adapters inside no gradient and B silently stays at zero. Under the trainer's own
    (non-reentrant) checkpointing B must move after 2 steps; the caller's reentrant
    checkpointing, which unlearn keeps, is refused with the fix (the routers' logits,
    recorded aside, would get no gradient either), never trained silently."""
    model = small_model(tokenizer)
    if reentrant:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed = []
    run = lambda: unlearn(  # noqa: E731
        model, tokenizer, data["forget"], data["retain"], AlterConfig(r=2, num_experts=3), "grad_diff",
        params="lora", gradient_checkpointing=True, max_steps=2, router_warmup=0, batch_size=2, progress=False,
        callback=lambda step, logs: checkpointed.append(_checkpointing(model)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if reentrant:
            with pytest.raises(RuntimeError, match="reentrant gradient checkpointing .* use non-reentrant"):
                run()
            return
        run()
    assert checkpointed == [True, True] and is_patched(model)
    B = adapter_parameters(model)["B"]
    assert all(b[0].abs().sum() > 0 for b in B), [float(b.abs().sum()) for b in B]


@pytest.mark.parametrize("params", PARAMS)
def test_reference_outputs_are_the_starting_model(params, data, tokenizer):
    """reference_outputs gives the starting model's logits after the weights moved: the
    frozen copy under full, the adapters disabled under lora/asym_lora."""
    from alter.methods import register
    from alter.methods.base import Method, labelled
    from alter.methods.losses import token_nll

    seen = []

    @register
    class ReferenceAscent(Method):
        name = "test_reference_ascent"
        needs_reference = True

        def loss(self, model, forget, retain):
            reference = self.reference_outputs(model, forget).logits
            seen.append((forget["input_ids"].clone(), forget["attention_mask"].clone(), reference))
            nll = token_nll(self.logits(model, forget, True), forget["labels"])
            return -self.global_mean(nll, labelled(forget["labels"])), {"forget": nll.detach()}

    model = small_model(tokenizer)
    start = small_model(tokenizer).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unlearn(model, tokenizer, data["forget"], data["retain"], AlterConfig(r=2, num_experts=3),
                "test_reference_ascent", params=params, lr=1e-2, max_steps=3, router_warmup=0, batch_size=2,
                progress=False)
    ids, mask, reference = seen[-1]
    assert not reference.requires_grad
    with torch.no_grad():
        expected = start(input_ids=ids, attention_mask=mask).logits
        moved = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    assert (moved - expected).abs().max() > 1e-3  # the trained model did move


def test_full_lr_is_sized_from_the_model(data, tokenizer):
    """LR_SCALE / sqrt(parameters), clipped: 1e-5 (open-unlearning's) for large models, and
    unlearn's default on params full (the same weights as the rate given explicitly)."""
    from alter.methods.params import LR_MAX, LR_MIN, LR_SCALE, full_lr

    for n, expected in ((10**9, LR_MIN), (100, LR_MAX), (4 * 10**6, LR_SCALE / 2000)):
        module = torch.nn.Module()  # parameters on the meta device: counted, never allocated
        module.weight = torch.nn.Parameter(torch.empty(n, device="meta"))
        assert full_lr(module) == pytest.approx(expected, rel=1e-12)
    assert full_lr(module) == pytest.approx(5e-5)  # 0.1 / sqrt(4e6)
    weights = []
    for lr in (None, full_lr(small_model(tokenizer))):
        model = small_model(tokenizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unlearn(model, tokenizer, data["forget"], data["retain"], method="grad_diff", lr=lr, max_steps=1,
                    batch_size=2, progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], torch.cat([p.detach().flatten() for p in small_model(tokenizer).parameters()]))
