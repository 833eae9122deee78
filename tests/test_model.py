"""Patching tiny random Hugging Face models: exactness of a fresh patch, forced routes
against LoRA merged by hand, remove/save/load, the entropy prepass, precomputed entropy,
A's gradient gating, the router loss, and errors at the boundary."""
import copy
import math

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
)

from alter.config import AlterConfig
from conftest import require_backend
from conftest import test_devices as devices_under_test  # renamed: pytest would collect test_*
from alter.layers import AsymLoRALinear
from alter.tracker import EntropyTracker
from alter.model import (
    adapter_parameters,
    alter_layers,
    apply_alter,
    disable_adapters,
    forced_route,
    is_patched,
    load_adapter,
    precomputed_entropy,
    remove_alter,
    router_loss,
    save_adapter,
)

VOCAB, BATCH, SEQ = 101, 2, 7
FAMILIES = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "gemma2": (Gemma2Config, {"head_dim": 12}),  # final-logit softcapping: the unfused prepass
    "phi3": (Phi3Config, {}),  # fused qkv_proj and gate_up_proj
    "gpt_neox": (GPTNeoXConfig, {}),  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    "falcon": (FalconConfig, {}),
    "bloom": (BloomConfig, {}),
    "phi": (PhiConfig, {}),  # q/k/v_proj, dense, fc1, fc2
    "gptj": (GPTJConfig, {"rotary_dim": 4}),  # q/k/v_proj, out_proj, fc_in, fc_out
    "opt": (OPTConfig, {"ffn_dim": 80, "word_embed_proj_dim": 48}),
}
NEOX_NAMES = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
ADAPTED_NAMES = {
    **{f: {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} for f in FAMILIES},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt_neox": NEOX_NAMES,
    "falcon": NEOX_NAMES,
    "bloom": NEOX_NAMES,
    "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
    "gptj": {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj"},  # fc1/fc2 sit on the layer itself: not by default
}
Q = 1.2


def tiny_model(family="llama", **overrides):
    """A 2-layer random causal LM in eval mode. initializer_range 0.5 spreads the token
    entropies around the default threshold 1.2, so both routing branches run."""
    config_class, extra = FAMILIES[family]
    values = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.5,
    )
    values.update(extra)
    values.update(overrides)
    return AutoModelForCausalLM.from_config(config_class(**values), attn_implementation="eager").eval()


def alter_config(**kwargs):
    kwargs.setdefault("backend", "eager")
    kwargs.setdefault("tsallis_q", Q)
    return AlterConfig(**kwargs)


def randomize_adapters(model, scale=0.3):
    with torch.no_grad():
        for layer in alter_layers(model).values():
            layer.lora_B.normal_(0.0, scale)
            layer.router.weight.normal_(0.0, scale)
            layer.router.entropy_weight.normal_(0.0, scale)


def tokens(batch=BATCH, seq=SEQ):
    return torch.randint(3, VOCAB, (batch, seq))


def tsallis64(logits, q=Q):
    """S_q of softmax(logits) in float64, straight from DESIGN §1."""
    p = torch.softmax(logits.double(), dim=-1)
    return (1 - (p**q).sum(-1)) / (q - 1)


# --- patching ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_patches_exactly_and_trains(family):
    model = tiny_model(family)
    ids = tokens()
    base_logits = model(input_ids=ids).logits
    # A learns from every token here (A's gating is tested below): some families' random
    # models put every token below the threshold.
    apply_alter(model, alter_config(a_learns_from_high_entropy_only=False))
    assert {name.rsplit(".", 1)[-1] for name in alter_layers(model)} == ADAPTED_NAMES[family]
    assert len(alter_layers(model)) == 2 * len(ADAPTED_NAMES[family])
    assert torch.equal(model(input_ids=ids).logits, base_logits)  # B = 0: exactly the base model

    randomize_adapters(model)
    model.train()
    with forced_route(model, [1, 3]):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + router_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        adapter = any(k in name for k in ("lora_A", "lora_B", "router."))
        assert param.requires_grad == adapter, name
        if adapter:
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.any(), name
        else:
            assert param.grad is None, name


def test_forced_expert_equals_lora_merged_by_hand():
    """Model level: with every token of sample i on expert e_i, the patched model is the
    base model with each adapted weight replaced by W0 + s·B_{e_i} A (merged in float64)."""
    model = tiny_model()
    base = copy.deepcopy(model)
    config = alter_config(r=4, alpha=6.0)
    apply_alter(model, config)
    randomize_adapters(model, 0.1)
    ids, experts = tokens(), [2, 0]
    with forced_route(model, experts):
        logits = model(input_ids=ids).logits
    for i, expert in enumerate(experts):
        merged = copy.deepcopy(base)
        with torch.no_grad():
            for name, layer in alter_layers(model).items():
                A, B = layer.lora_A.double(), layer.lora_B[expert].double()
                weight = merged.get_submodule(name).weight
                weight.copy_(weight.double() + config.scaling * B @ A)
        expected = merged(input_ids=ids[i : i + 1]).logits[0]
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)  # fp32 model, 2 layers


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed layers rerun their forward in backward: the tracker must still hold
    this batch's entropy and routes (backward inside forced_route)."""
    model = apply_alter(tiny_model(), alter_config())
    randomize_adapters(model)
    reference = copy.deepcopy(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    ids = tokens()
    for m in (model.train(), reference.train()):
        with forced_route(m, [1, 2]):
            (m(input_ids=ids, labels=ids).loss + router_loss(m)).backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def triton_and_eager_twins(device):
    """The same randomized one-layer patched model twice: on the triton kernels and on
    the eager path, with a batch of tokens."""
    require_backend("triton", device)
    model = apply_alter(tiny_model(num_hidden_layers=1).to(device), alter_config(backend="triton"))
    randomize_adapters(model)
    reference = copy.deepcopy(model)
    reference.alter_config.backend = "eager"
    return model, reference, tokens().to(device)


@pytest.mark.parametrize("device", devices_under_test())
def test_triton_backend_matches_eager_through_the_model(device):
    """Every op of a training step (fused entropy prepass, route, asym_lora forward and
    backward) through the triton kernels, against the same model on the eager path."""
    model, reference, ids = triton_and_eager_twins(device)
    outputs = []
    for m in (model.train(), reference.train()):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs.append((out.logits, m.alter_tracker.last_call.entropy))
    (logits, entropy), (ref_logits, ref_entropy) = outputs
    # fp32 kernels against fp32 eager: accumulation order only.
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", devices_under_test())
def test_triton_training_loss_curve_matches_eager(device):
    """Several AdamW steps of a patched tiny model, routed by the trained router, on the
    triton kernels and on the eager path: the two loss curves agree step by step."""
    model, reference, ids = triton_and_eager_twins(device)
    curves = []
    for m in (model.train(), reference.train()):
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(5):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert not torch.equal(curves[1][0], curves[1][-1])  # the adapters did learn
    # fp32 kernels against fp32 eager: only accumulation order differs, amplified a little
    # by five optimizer steps.
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-4, atol=1e-5)


def test_only_adapter_parameters_train_and_groups_are_complete():
    model = apply_alter(tiny_model(), alter_config())
    groups = adapter_parameters(model)
    layers = alter_layers(model).values()
    assert [id(p) for p in groups["A"]] == [id(layer.lora_A) for layer in layers]
    assert [id(p) for p in groups["B"]] == [id(layer.lora_B) for layer in layers]
    assert len(groups["router"]) == 2 * len(layers)
    grouped = {id(p) for group in groups.values() for p in group}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_remove_alter_restores_modules_flags_and_logits():
    model = tiny_model()
    model.lm_head.requires_grad_(False)  # a flag of the user's, to be restored as it was
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    ids = tokens()
    base_logits = model(input_ids=ids).logits
    apply_alter(model, alter_config())
    randomize_adapters(model)
    assert not torch.allclose(model(input_ids=ids).logits, base_logits)
    assert remove_alter(model) is model
    assert not any(isinstance(m, AsymLoRALinear) for m in model.modules())
    assert all(model.get_submodule(name) is module for name, module in originals.items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not is_patched(model) and not hasattr(model, "alter_config")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(model(input_ids=ids).logits, base_logits)
    apply_alter(model, alter_config())  # can be patched again


def test_deepcopy_of_a_patched_model_is_independent():
    model = apply_alter(tiny_model(), alter_config())
    randomize_adapters(model)
    ids = tokens()
    clone = copy.deepcopy(model)
    assert clone.alter_tracker is not model.alter_tracker
    assert all(layer.tracker is clone.alter_tracker for layer in alter_layers(clone).values())
    assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
    remove_alter(clone)
    assert model._forward_pre_hooks and is_patched(model)  # the original keeps its hooks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_float32_adapters(dtype):
    model = tiny_model().to(dtype)
    ids = tokens()
    base_logits = model(input_ids=ids).logits
    apply_alter(model, alter_config())
    assert {p.dtype for group in adapter_parameters(model).values() for p in group} == {torch.float32}
    assert torch.equal(model(input_ids=ids).logits, base_logits)
    randomize_adapters(model)
    model.train()
    with forced_route(model, [0, 3]):
        logits = model(input_ids=ids).logits
    assert logits.dtype == dtype
    logits.float().logsumexp(-1).mean().backward()
    for layer in alter_layers(model).values():
        assert layer.lora_B.grad.dtype == torch.float32 and torch.isfinite(layer.lora_B.grad).all()
        assert layer.lora_B.grad.any()


def test_disable_adapters_gives_exactly_the_base_model():
    model = tiny_model()
    ids = tokens()
    base_logits = model(input_ids=ids).logits
    apply_alter(model, alter_config())
    randomize_adapters(model)
    with disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    assert not torch.allclose(model(input_ids=ids).logits, base_logits)


def test_apply_alter_errors():
    with pytest.raises(ValueError, match=r"no nn.Linear module of LlamaForCausalLM matches target_modules \['c_attn'\]"):
        apply_alter(tiny_model(), alter_config(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match="config must be an AlterConfig"):
        apply_alter(tiny_model(), {"r": 8})
    model = apply_alter(tiny_model(), alter_config())
    with pytest.raises(ValueError, match="already has ALTER adapters"):
        apply_alter(model, alter_config())
    for function in (remove_alter, router_loss, adapter_parameters):
        with pytest.raises(ValueError, match="has no ALTER adapters; call apply_alter"):
            function(tiny_model())


def test_a_conv1d_model_is_refused_with_the_reason():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    why = (r"it has no nn.Linear module to adapt \(the output embedding is never adapted\)\. "
           r"Its projections \['c_attn', 'c_fc', 'c_proj'\] are transformers Conv1D modules \(weight \[in, out\]\), which AsymLoRA does not adapt: it wraps nn.Linear only\. "
           r"Use a model whose projections are nn.Linear .* or replace each Conv1D by an nn.Linear")
    with pytest.raises(ValueError, match=r"no nn.Linear module of GPT2LMHeadModel matches target_modules .*" + why):
        apply_alter(gpt2, alter_config())
    with pytest.raises(ValueError, match=r"matches target_modules \['c_attn'\].*" + why):
        apply_alter(gpt2, alter_config(target_modules=["c_attn"]))
    no_note = r"its linear modules are named \[[^]]*\] \(the output embedding is never adapted\)$"  # no Conv1D
    with pytest.raises(ValueError, match=no_note):
        apply_alter(tiny_model(), alter_config(target_modules=["c_attn"]))


def test_target_modules_match_dotted_suffixes():
    model = apply_alter(tiny_model(), alter_config(target_modules=["self_attn.q_proj", "down_proj"]))
    assert sorted({n.rsplit(".", 1)[-1] for n in alter_layers(model)}) == ["down_proj", "q_proj"]


def test_an_adapter_saved_with_the_earlier_default_still_patches():
    earlier = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]
    model = apply_alter(tiny_model(), alter_config(target_modules=earlier))
    assert {n.rsplit(".", 1)[-1] for n in alter_layers(model)} == ADAPTED_NAMES["llama"]


def test_the_output_embedding_and_multihead_attention_are_never_adapted():
    with pytest.raises(ValueError, match=r"no nn.Linear module of LlamaForCausalLM matches target_modules \['lm_head'\]"):
        apply_alter(tiny_model(), alter_config(target_modules=["lm_head"]))

    class TorchEncoder(nn.Module):  # nn.MultiheadAttention reads out_proj.weight itself
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.q_proj = nn.Linear(16, 16)

    model = apply_alter(TorchEncoder(), alter_config(entropy_source="precomputed"))
    assert list(alter_layers(model)) == ["q_proj"]


# --- save / load ---------------------------------------------------------------------------


def test_save_then_load_gives_identical_logits(tmp_path):
    model = tiny_model()
    fresh, fresh_patched = copy.deepcopy(model), copy.deepcopy(model)
    config = alter_config(r=4, num_experts=3, k_high=2)
    apply_alter(model, config)
    randomize_adapters(model)
    with torch.no_grad():
        for layer in alter_layers(model).values():
            layer.lora_A.normal_()
    save_adapter(model, tmp_path / "adapter")
    ids = tokens()
    expected = model(input_ids=ids).logits

    assert load_adapter(fresh, tmp_path / "adapter") is fresh  # unpatched: patched with the saved config
    assert fresh.alter_config == config
    assert torch.equal(fresh(input_ids=ids).logits, expected)
    apply_alter(fresh_patched, alter_config(r=4, num_experts=3, k_high=2))
    load_adapter(fresh_patched, tmp_path / "adapter")
    assert torch.equal(fresh_patched(input_ids=ids).logits, expected)


def test_a_patched_model_refuses_save_pretrained_until_remove_alter(tmp_path):
    model = apply_alter(tiny_model(), alter_config())
    for patched in (model, copy.deepcopy(model)):
        with pytest.raises(ValueError, match=r"save_pretrained: this LlamaForCausalLM carries ALTER adapters.*"
                                             r"randomly initialized model.*alter.save_adapter\(model, directory\).*"
                                             r"alter.load_adapter\(base_model, directory\).*alter.remove_alter\(model\).*"
                                             r"alter.merge_adapters\(model, data\)"):
            patched.save_pretrained(tmp_path / "patched")
    assert not (tmp_path / "patched").exists()
    ids = tokens()
    expected = model(input_ids=ids).logits
    remove_alter(model).save_pretrained(tmp_path / "base")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    assert torch.equal(reloaded(input_ids=ids).logits, expected)  # a fresh adapter: the base model


def test_saved_files_follow_the_documented_layout(tmp_path):
    from safetensors.torch import load_file

    model = apply_alter(tiny_model(), alter_config(target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "model.layers.1.self_attn.q_proj"
    assert {k for k in tensors if k.startswith(prefix)} == {
        f"{prefix}.{s}" for s in ("lora_A", "lora_B", "router.weight", "router.entropy_weight")
    }
    assert len(tensors) == 8
    assert AlterConfig.from_pretrained(tmp_path) == model.alter_config
    assert '"model_type": "llama"' in (tmp_path / "adapter_config.json").read_text()


@pytest.mark.parametrize(
    "saved, loaded, match",
    [
        (dict(r=4), dict(r=8), r"module 'model.layers.0.self_attn.q_proj': lora_A has shape \[4, 48\].*r=4.*r=8"),
        (dict(num_experts=3), dict(num_experts=4), r"module 'model.layers.0.self_attn.q_proj': lora_B has shape \[3, 48, 8\]"),
        (dict(target_modules=["q_proj"]), dict(target_modules=["q_proj", "v_proj"]), r"no tensor 'model.layers.0.self_attn.v_proj.lora_A' for module 'model.layers.0.self_attn.v_proj'"),
        (dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["q_proj"]), r"weights for module 'model.layers.0.self_attn.v_proj', which this model does not adapt"),
    ],
)
def test_mismatched_adapter_raises_naming_the_module(tmp_path, saved, loaded, match):
    save_adapter(apply_alter(tiny_model(), alter_config(**saved)), tmp_path)
    with pytest.raises(ValueError, match=match):
        load_adapter(apply_alter(tiny_model(), alter_config(**loaded)), tmp_path)


def test_adapter_of_another_model_is_refused_and_leaves_the_model_unpatched(tmp_path):
    save_adapter(apply_alter(tiny_model(), alter_config()), tmp_path / "llama")
    with pytest.raises(ValueError, match="saved for a model with model_type='llama', this model has model_type='mistral'"):
        load_adapter(tiny_model("mistral"), tmp_path / "llama")
    save_adapter(apply_alter(tiny_model(hidden_size=64), alter_config()), tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden_size=64, this model has hidden_size=48"):
        load_adapter(tiny_model(), tmp_path / "wide")
    # Shapes that do not fit an unpatched model: the patch it got for loading is undone.
    save_adapter(apply_alter(tiny_model(intermediate_size=96), alter_config()), tmp_path / "mlp")
    model = tiny_model()
    with pytest.raises(ValueError, match=r"module 'model.layers.0.mlp.gate_proj': lora_B has shape \[4, 96, 8\]"):
        load_adapter(model, tmp_path / "mlp")
    assert not is_patched(model) and not alter_layers(model)


def test_load_adapter_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        load_adapter(tiny_model(), tmp_path)


# --- entropy sources --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # fused head / softcapped logits
def test_prepass_entropy_is_the_base_models_entropy(family):
    model = tiny_model(family, attention_dropout=0.5)  # dropout must be off in the prepass
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    expected = tsallis64(model(input_ids=ids, attention_mask=mask).logits)
    apply_alter(model, alter_config())
    randomize_adapters(model)
    decoder_calls = []
    model.model.register_forward_hook(lambda *args: decoder_calls.append(1))
    model.train()
    model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(model.alter_tracker.last_call.entropy.double(), expected, rtol=1e-5, atol=1e-5)
    assert len(decoder_calls) == 2  # one prepass, one adapted forward: no recursion
    assert all(m.training for m in model.modules())  # train mode restored after the prepass


def test_precomputed_entropy_replaces_the_prepass():
    model = apply_alter(tiny_model(), alter_config())
    randomize_adapters(model)
    ids = tokens()
    prepass_logits = model(input_ids=ids).logits
    base_entropy = model.alter_tracker.last_call.entropy.clone()
    assert (base_entropy > 1.2).any() and (base_entropy <= 1.2).any()  # both routing branches run
    model.alter_config.entropy_source = "precomputed"
    with pytest.raises(RuntimeError, match="entropy_source='precomputed' but no entropy was given"):
        model(input_ids=ids)
    with precomputed_entropy(model, base_entropy):
        assert torch.equal(model(input_ids=ids).logits, prepass_logits)
    with precomputed_entropy(model, base_entropy.flip(-1)):  # other entropies route differently
        assert not torch.allclose(model(input_ids=ids).logits, prepass_logits)


@pytest.mark.parametrize("device", devices_under_test())
def test_given_entropy_and_routes_reach_the_layers_without_per_layer_copies(device, monkeypatch):
    """Entropy and forced experts given on the CPU move to the input's device once per
    forward: every layer reads the tracker's own tensors (a per-layer host-to-device copy
    blocks the host once per layer on a GPU). On a CPU-only run the device is the same and
    the check still pins the single shared tensor."""
    model = apply_alter(tiny_model().to(device), alter_config(entropy_source="precomputed"))
    tracker = model.alter_tracker
    seen = []
    read_entropy = EntropyTracker.token_entropy

    def token_entropy(self, state, num_tokens, layer_device):
        entropy = read_entropy(self, state, num_tokens, layer_device)
        seen.append(entropy.data_ptr() == state.entropy.data_ptr() and state.forced_experts.device == layer_device)
        return entropy

    monkeypatch.setattr(EntropyTracker, "token_entropy", token_entropy)
    ids = tokens().to(device)
    with precomputed_entropy(model, torch.rand(BATCH, SEQ) * 3), forced_route(model, [1, 0]):
        model(input_ids=ids)
        call = tracker.last_call
        assert call.entropy.device == ids.device and call.forced_experts.device == ids.device
    assert len(seen) == len(alter_layers(model)) and all(seen), seen


def test_precomputed_entropy_of_the_wrong_shape_is_refused():
    model = apply_alter(tiny_model(), alter_config(entropy_source="precomputed"))
    with precomputed_entropy(model, torch.rand(BATCH, SEQ - 1)):
        with pytest.raises(ValueError, match=r"precomputed entropy has shape \(2, 6\) but the input has shape \(2, 7\)"):
            model(input_ids=tokens())
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        with precomputed_entropy(model, torch.rand(BATCH * SEQ)):
            pass


# --- A's gradient gating and the router loss ---------------------------------------------------


@pytest.mark.parametrize("threshold, a_learns", [(100.0, False), (0.001, True)])
def test_lora_a_learns_only_through_high_entropy_tokens(threshold, a_learns):
    model = apply_alter(tiny_model(), alter_config(entropy_threshold=threshold, a_learns_from_high_entropy_only=True))
    randomize_adapters(model)  # B != 0, else dA = 0 whatever the gating
    model.train()
    ids = tokens()
    with forced_route(model, [1, 2]):
        model(input_ids=ids, labels=ids).loss.backward()
    for name, layer in alter_layers(model).items():
        a_grad = layer.lora_A.grad
        assert (a_grad is not None and bool(a_grad.any())) == a_learns, name
        assert layer.lora_B.grad is not None and layer.lora_B.grad[1:3].any(), name


def test_router_loss_matches_cross_entropy_by_hand():
    model = apply_alter(tiny_model(), alter_config())
    randomize_adapters(model)
    layer_inputs = {}
    for name, layer in alter_layers(model).items():
        layer.register_forward_hook(lambda m, args, out, name=name: layer_inputs.__setitem__(name, args[0]))
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # padding does not count
    experts = torch.tensor([3, 1])
    with forced_route(model, experts):
        model(input_ids=ids, attention_mask=mask)
    loss = router_loss(model)
    entropy = model.alter_tracker.last_call.entropy.reshape(-1).double()
    targets = experts.repeat_interleave(SEQ)
    keep = mask.reshape(-1).bool()
    per_layer = []
    for name, layer in alter_layers(model).items():
        x = layer_inputs[name].reshape(-1, layer.in_features).double()
        logits = x @ layer.router.weight.double().t() + entropy[:, None] * layer.router.entropy_weight.double()
        per_layer.append(torch.nn.functional.cross_entropy(logits[keep], targets[keep]))
    torch.testing.assert_close(loss.double(), torch.stack(per_layer).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    for layer in alter_layers(model).values():
        assert layer.router.weight.grad.any() and layer.router.entropy_weight.grad.any()


def test_router_loss_of_a_fresh_router_is_log_num_experts():
    model = apply_alter(tiny_model(), alter_config(num_experts=5, k_high=3))
    with forced_route(model, torch.tensor([4, 0])):
        model(input_ids=tokens())
    assert math.isclose(router_loss(model).item(), math.log(5), rel_tol=1e-6)  # zero logits: uniform
    model(input_ids=tokens())  # a forward outside forced_route records nothing
    with pytest.raises(RuntimeError, match="no router logits were recorded"):
        router_loss(model)


@pytest.mark.parametrize(
    "experts, error, match",
    [
        ([0, 4], ValueError, r"expert ids must be in \[0, 4\), got \[0, 4\]"),
        ([-1, 0], ValueError, r"expert ids must be in \[0, 4\)"),
        (torch.tensor([0.0, 1.0]), TypeError, "experts must hold integers"),
        (torch.zeros(2, 1, dtype=torch.long), ValueError, "1-D sequence"),
        (["a", 1], TypeError, "experts must be integers"),
    ],
)
def test_forced_route_validates_expert_ids(experts, error, match):
    model = apply_alter(tiny_model(), alter_config())
    with pytest.raises(error, match=match):
        with forced_route(model, experts):
            pass


def test_forced_route_for_another_batch_size_is_refused():
    model = apply_alter(tiny_model(), alter_config())
    with forced_route(model, [0, 1, 2]):
        with pytest.raises(ValueError, match="experts were given for 3 samples but the batch has 2"):
            model(input_ids=tokens())
