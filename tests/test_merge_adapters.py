"""merge_adapters: layers whose routes on the data are one expert with gate ~1 become one
nn.Linear of W0 + s·B_e A (float64 reference written here); others stay patched; the
reported max logit difference is the one measured; under "prepass" only a full merge
happens (a partial one would change the base model's entropy)."""
import pytest
import torch
from torch import nn

from alter import MergeReport, merge_adapters
from alter.model import alter_layers, apply_alter, is_patched, precomputed_entropy
from test_model import alter_config, randomize_adapters, tiny_model, tokens


def route_everything_to(model, expert, layers=None):
    """Routers that send every token to ``expert`` (a large bias through the entropy term,
    with entropy > 0 for every token of a random model)."""
    with torch.no_grad():
        for name, layer in alter_layers(model).items():
            if layers is None or name in layers:
                layer.router.weight.zero_()
                layer.router.entropy_weight.zero_()
                layer.router.entropy_weight[expert] = 50.0


@pytest.mark.parametrize("source", ["prepass", "lagged"])
def test_full_merge_unpatches_and_keeps_the_logits(source):
    model = apply_alter(tiny_model().double(), alter_config(entropy_source=source, backend=None))
    randomize_adapters(model, 0.5)
    route_everything_to(model, 2)
    layers = {name: (layer.base_layer.weight.detach().clone(), layer.lora_A.detach().double(),
                     layer.lora_B.detach().double(), layer.scaling) for name, layer in alter_layers(model).items()}
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    report = merge_adapters(model, ids, threshold=0.999)
    assert isinstance(report, MergeReport) and report.unpatched and not report.kept
    assert set(report.merged) == set(layers) and set(report.merged.values()) == {2}
    assert not is_patched(model)
    for name, (w0, A, B, s) in layers.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear
        torch.testing.assert_close(merged.weight, w0 + s * B[2] @ A, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    difference = float((got - expected).abs().max())
    assert difference < 1e-8
    assert report.max_logit_difference == pytest.approx(difference, abs=1e-12)


def test_partial_merge_keeps_mixed_layers_patched_under_precomputed_entropy():
    model = apply_alter(tiny_model().double(), alter_config(entropy_source="precomputed", backend=None))
    randomize_adapters(model, 0.5)
    names = list(alter_layers(model))
    route_everything_to(model, 1, layers=names[:3])
    ids = tokens()
    entropy = torch.rand(ids.shape) * 2 + 0.1
    with precomputed_entropy(model, entropy):
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        report = merge_adapters(model, threshold=0.999, data={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert set(report.merged) == set(names[:3]) and set(report.kept) == set(names[3:])
        assert is_patched(model) and set(alter_layers(model)) == set(names[3:])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-9, atol=1e-9)
    assert report.max_logit_difference < 1e-9


@pytest.mark.parametrize("source", ["prepass", "lagged"])
def test_base_entropy_sources_merge_nothing_unless_every_layer_qualifies(source):
    model = apply_alter(tiny_model(), alter_config(entropy_source=source, backend=None))
    randomize_adapters(model, 0.5)
    names = list(alter_layers(model))
    route_everything_to(model, 1, layers=names[:3])
    report = merge_adapters(model, data=tokens())
    assert report.merged == {} and set(report.kept) == set(names) and is_patched(model)
    assert source in report.kept[names[0]] and "experts" in report.kept[names[-1]]


def test_merge_adapters_validates_its_arguments():
    model = apply_alter(tiny_model(), alter_config())
    with pytest.raises(ValueError, match="threshold must be a number in"):
        merge_adapters(model, threshold=1.5, data=tokens())
    with pytest.raises(ValueError, match="data must be token ids"):
        merge_adapters(model, data=torch.rand(2, 3))
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'data'"):
        merge_adapters(model)  # the routes are measured on the data: no default
    with pytest.raises(ValueError, match="no ALTER adapters"):
        merge_adapters(tiny_model(), data=tokens())
