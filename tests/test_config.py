"""AlterConfig: defaults, JSON round-trips and validation errors at construction."""
import json

import pytest

from alter.config import ADAPTER_CONFIG_NAME, DEFAULT_TARGET_MODULES, AlterConfig


def test_defaults_follow_the_paper_and_design():
    config = AlterConfig()
    assert (config.r, config.alpha, config.num_experts) == (8, 16.0, 4)
    assert (config.entropy_threshold, config.tau_high, config.tau_low, config.k_high, config.k_low) == (
        1.2,
        0.8,
        0.01,
        3,
        1,
    )
    assert (config.lr_A, config.lr_B) == (1e-3, 3e-3)
    assert (config.forget_loss, config.train_routes) == ("ihl", "router")
    assert config.scaling == 2.0
    assert config.target_modules == list(DEFAULT_TARGET_MODULES)
    # S_q < 1/(q-1) for q > 1: the default q must leave the default threshold reachable.
    assert config.tsallis_q <= 1 or 1 / (config.tsallis_q - 1) > config.entropy_threshold


def test_default_target_list_is_not_shared_between_instances():
    a, b = AlterConfig(), AlterConfig()
    a.target_modules.append("lm_head")
    assert "lm_head" not in b.target_modules


def _non_default_config():
    return AlterConfig(
        r=4,
        alpha=7.5,
        dropout=0.1,
        num_experts=5,
        target_modules=["q_proj", "down_proj"],
        tsallis_q=0.5,
        entropy_threshold=2.0,
        tau_high=0.7,
        tau_low=0.02,
        k_high=2,
        k_low=2,
        high_entropy_weight=0.25,
        beta=0.5,
        gamma=2.0,
        lam=0.1,
        lr_A=2e-5,
        lr_B=3e-3,
        entropy_source="lagged",
        backend="eager",
        a_learns_from_high_entropy_only=True,
    )


def test_dict_and_json_round_trip(tmp_path):
    config = _non_default_config()
    assert AlterConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.json"
    config.to_json_file(path)
    assert AlterConfig.from_json_file(path) == config
    assert json.loads(path.read_text())["num_experts"] == 5


def test_save_pretrained_round_trip_keeps_the_base_model_record_out_of_the_config(tmp_path):
    config = _non_default_config()
    config.save_pretrained(tmp_path / "adapter", base_model={"model_type": "llama", "hidden_size": 48})
    stored = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert stored["base_model"] == {"model_type": "llama", "hidden_size": 48}
    assert AlterConfig.from_pretrained(tmp_path / "adapter") == config


def test_from_dict_fills_missing_keys_with_defaults():
    assert AlterConfig.from_dict({"r": 2}) == AlterConfig(r=2)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['rank'\]"):
        AlterConfig.from_dict({"rank": 8})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), r"r \(the LoRA rank\) must be >= 1"),
        (dict(r=2.5), "r must be an int"),
        (dict(num_experts=1, k_high=1), "num_experts must be >= 2"),
        (dict(tsallis_q=0.0), "tsallis_q must be > 0"),
        (dict(tsallis_q=float("nan")), "tsallis_q must be a finite number"),
        (dict(k_low=0), "1 <= k_low <= k_high <= num_experts"),
        (dict(k_low=3, k_high=2), "1 <= k_low <= k_high <= num_experts"),
        (dict(k_high=5), "1 <= k_low <= k_high <= num_experts"),
        (dict(entropy_threshold=0.0), "entropy_threshold must be > 0"),
        (dict(tau_high=-1.0), "tau_high must be > 0"),
        (dict(tau_low=0.0), "tau_low must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), "dropout must be >= 0"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(lr_A=0.0), "lr_A must be > 0"),
        (dict(beta=-1.0), "beta must be >= 0"),
        (dict(high_entropy_weight=-0.5), "high_entropy_weight must be >= 0"),
        (dict(entropy_source="cached"), "entropy_source must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(target_modules="q_proj"), "target_modules must be a list"),
        (dict(target_modules=[]), "target_modules must name at least one module"),
        (dict(a_learns_from_high_entropy_only=1), "a_learns_from_high_entropy_only must be a bool"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlterConfig(**kwargs)


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="num_experts must be >= 2"):
        AlterConfig.from_dict({"num_experts": 1, "k_high": 1})
