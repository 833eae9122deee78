"""The per-method layout (alter.methods): the registry, the shared bases, the arguments
dataclass as the one source of validation, resume fingerprint and run record, and a
method's step against a float64 recomputation of its loss."""
import contextlib
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from alter.config import AlterConfig
from alter.methods import ADAPTER_METHODS, METHODS, method_class
from alter.methods.alter import Alter
from alter.training.args import UnlearnArgs
from alter.methods.asym_lora import AsymLoRA
from alter.methods.base import Method
from alter.train import RUN_ARGS_FILE, encode_dataset, unlearn
from conftest import small_model  # with the data and tokenizer fixtures of conftest


def test_registry_has_one_class_per_method_each_owning_its_loss():
    assert METHODS[:6] == ("alter", "asym_lora", "lora", "grad_ascent", "grad_diff", "npo")
    for name in METHODS:
        cls = method_class(name)
        assert cls.name == name and issubclass(cls, Method)
        # lora: the kept name of grad_diff on params lora, its loss grad_diff's; idk_dpo: dpo's loss on other data
        assert "loss" in vars(cls) or name in ("lora", "idk_dpo"), f"{name} does not define its own loss"
        assert (name in ADAPTER_METHODS) == cls.routed() == (cls.default_params != "full")
        assert cls.default_params in cls.supported_params
    assert [name for name in METHODS[:6] if method_class(name).default_params != "full"] == ["alter", "asym_lora", "lora"]
    assert not issubclass(Alter, AsymLoRA)  # two losses side by side, not flags on one
    assert [name for name in METHODS if not method_class(name).needs_retain] == ["grad_ascent", "undial", "ceu"]


def test_args_fields_are_the_fingerprint_and_the_record():
    roles = {f.name: f.metadata["role"] for f in dataclasses.fields(UnlearnArgs)}
    args = UnlearnArgs(method="npo", method_args={"beta": 0.3}, max_grad_norm=None, max_length=50)
    assert set(args.fingerprint()) == {name for name, role in roles.items() if role == "fingerprint"}
    assert set(args.record()) == set(args.fingerprint()) | {"epochs"}
    # what the hand-written lists used to miss
    assert {"method_args": {"beta": 0.3}, "max_grad_norm": None, "max_length": 50}.items() <= args.fingerprint().items()
    assert args.fingerprint()["config"] == AlterConfig().to_dict()
    with pytest.raises(ValueError, match="method must be one of"):
        UnlearnArgs(method="nope")
    with pytest.raises(ValueError, match="router_lr is for the adapter methods"):
        UnlearnArgs(method="npo", router_lr=1e-3)
    with pytest.raises(ValueError, match="distributed must be one of"):
        UnlearnArgs(distributed="ring")


def test_saved_record_holds_every_recorded_argument(data, tokenizer, tmp_path):
    unlearn(small_model(tokenizer), tokenizer, data["forget"], None, method="grad_ascent", batch_size=2, max_steps=1,
            lr=2e-4, epochs=3, output_dir=str(tmp_path), progress=False)
    record = json.loads((tmp_path / RUN_ARGS_FILE).read_text())
    expected = UnlearnArgs(method="grad_ascent", batch_size=2, lr=2e-4, epochs=3).record()
    assert {k: record[k] for k in expected} == expected
    assert record["steps"] == 1 and record["n_forget"] == len(data["forget"])


def test_saved_record_and_adapter_hold_one_config(data, tokenizer, tmp_path):
    """The adapter methods gate generation by lagged entropy: the run record says so too."""
    unlearn(small_model(tokenizer), tokenizer, data["forget"], data["retain"], method="asym_lora", batch_size=2,
            max_steps=1, router_warmup=0, output_dir=str(tmp_path), progress=False)
    record = json.loads((tmp_path / RUN_ARGS_FILE).read_text())
    assert record["config"] == AlterConfig.from_pretrained(tmp_path).to_dict()
    assert record["config"]["entropy_source"] == "lagged"


def test_grad_diff_step_loss_equals_a_float64_recomputation(data, tokenizer):
    """The logged loss of grad_diff's first step is gamma * -NLL(forget) + alpha * NLL(retain)
    (open-unlearning's names) of the batches the run picked, recomputed here in float64
    from the starting model (the trainer takes the NLL of float64 logits in float32)."""
    model = small_model(tokenizer).double()
    start = copy.deepcopy(model)
    logs = []
    unlearn(model, tokenizer, data["forget"], data["retain"], None, "grad_diff", batch_size=2, max_steps=1,
            method_args={"gamma": 0.7, "alpha": 1.3}, progress=False, callback=lambda step, log: logs.append(log))
    from alter.train import step_indices

    def nll(rows):
        total = count = 0.0
        for example in rows:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"])[1:]
            logits = start(input_ids=ids).logits[0, :-1]
            keep = labels != -100
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
        return total / count

    forget = encode_dataset(tokenizer, data["forget"], "forget", None)
    retain = encode_dataset(tokenizer, data["retain"], "retain", None)
    forget_ids, retain_ids = step_indices(0, len(forget), len(retain), 2, 0)
    f, r = nll([forget[int(i)] for i in forget_ids]), nll([retain[int(i)] for i in retain_ids])
    assert logs[0]["forget"] == pytest.approx(-f, rel=1e-6)
    assert logs[0]["retain"] == pytest.approx(r, rel=1e-6)
    assert logs[0]["loss"] == pytest.approx(0.7 * -f + 1.3 * r, rel=1e-6)


@pytest.mark.parametrize("method", ["alter", "npo"])
def test_setup_returns_new_examples_and_leaves_the_given_ones(method, data, tokenizer):
    from alter.methods import build

    forget = encode_dataset(tokenizer, data["forget"], "forget", None)
    retain = encode_dataset(tokenizer, data["retain"], "retain", None)
    before = copy.deepcopy((forget, retain))
    args = UnlearnArgs(method=method, config=AlterConfig(r=2, num_experts=3), batch_size=2)
    _, new_forget, new_retain = build(args, lambda: contextlib.nullcontext()).setup(
        small_model(tokenizer), forget, retain, tokenizer.pad_token_id)
    assert (forget, retain) == before
    fields = {"alter": {"entropy", "expert", "route_mask"}, "npo": {"ref_logprob"}}[method]
    assert all(fields <= set(row) for row in new_forget)
    assert all(len(row["input_ids"]) == len(example["input_ids"]) for row, example in zip(new_forget, forget))
    if method == "alter":
        assert all(row["expert"] == 0 and all(row["route_mask"]) for row in new_retain)
        assert {row["expert"] for row in new_forget} <= {1, 2}


def test_a_method_is_one_registered_class_with_its_loss(data, tokenizer):
    """Adding a method is one class: its loss and what it needs, registered by name."""
    from alter.methods import method_names, register
    from alter.methods.base import Method, labelled
    from alter.methods.losses import token_nll

    @register
    class HalfAscent(Method):
        name = "test_half_ascent"
        needs_retain = False

        def loss(self, model, forget, retain):
            nll = token_nll(self.logits(model, forget, True), forget["labels"])
            return -0.5 * self.global_mean(nll, labelled(forget["labels"])), {"forget": nll.detach()}

    assert method_names()[:len(METHODS)] == METHODS and "test_half_ascent" in method_names()
    logs = []
    unlearn(small_model(tokenizer), tokenizer, data["forget"], None, method="test_half_ascent", batch_size=2,
            max_steps=2, lr=1e-3, progress=False, callback=lambda step, log: logs.append(log))
    assert len(logs) == 2 and logs[0]["loss"] == pytest.approx(-0.5 * logs[0]["forget"])
