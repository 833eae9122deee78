"""Model-level benchmark cases: one ALTER training step through the trainer's own code,
and prefill and greedy decoding of a patched model against the unpatched one. A tiny
Llama on the CPU, Llama-3-8B cut to two layers on a GPU.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
from bench_cases import BenchCase

from alter.adapters import precomputed_entropy
from alter.config import AlterConfig


def _model_config(device: torch.device, quick: bool):
    """(LlamaConfig, dtype, (batch, seq_len)): Llama-3-8B cut to two layers on a GPU,
    a tiny Llama on the CPU."""
    from transformers import LlamaConfig

    if device.type == "cuda":
        return LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        ), torch.bfloat16, (4, 1024)
    return LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    ), torch.float32, ((2, 64) if quick else (4, 128))


def _bench_alter_config(variant: str, entropy_source: str) -> AlterConfig:
    """``eager`` puts every op of the layers and the prepass on the eager path;
    ``kernels`` lets the dispatcher pick the fastest backend of each op."""
    # high_entropy_weight: a random model's tokens are all high-entropy; a nonzero weight
    # keeps every forget token in the IHL, as the low-entropy tokens of real data are.
    return AlterConfig(
        r=8, num_experts=8, k_high=3, high_entropy_weight=0.1, entropy_source=entropy_source,
        backend="eager" if variant == "eager" else None,
    )


def _build_model(device, quick, variant, entropy_source="prepass", sequence_route=False):
    """The model of :func:`_model_config`, built on ``device``; ``base`` leaves it
    unpatched, ``eager`` / ``kernels`` patch it (see :func:`_bench_alter_config`) with
    random experts B (their zero init would make every adapter output zero).
    ``sequence_route``: the route of an adapter ``unlearn`` saved (``routing="sequence"``,
    lagged entropy), with a key at the fourth token of the first sample, so that both
    retention and forget experts run."""
    from transformers import LlamaForCausalLM

    from alter.adapters import apply_alter

    config, dtype, (batch, seq) = _model_config(device, quick)
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: an 8B-shaped model on a GPU in ms
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    alter_config = None
    if variant != "base":
        alter_config = _bench_alter_config(variant, entropy_source)
        if sequence_route:
            alter_config = dataclasses.replace(alter_config, routing="sequence",
                                               route_keys=[{"tokens": [int(input_ids[0, 3])], "expert": 1}])
        model = apply_alter(model, alter_config)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.01)
    return model, alter_config, input_ids


def _train_step(dev: torch.device, quick: bool, method: str, backend_variant: str, routing: str | None = "token"):
    """A train-step case's closure: one ``method`` step as ``alter.unlearn`` runs it,
    through the trainer's own setup and step function (so the case cannot drift from the
    trainer): the base-model pass caches the entropy, the model is patched, then each step
    is the method's ``step`` (its forget and retain passes, plus the routers' passes of the
    AsymLoRA parameterization) and the optimizer step. Half the rows are forget samples (a
    random prompt, then an answer), half retain samples. As in the trainer, autocast on a
    GPU; gradient checkpointing stays off (the kernels are timed, not the recompute).
    ``backend_variant``: ``eager`` or ``kernels`` (:func:`_bench_alter_config`); ``routing``:
    the config's (None, the default: the sequence route, keys found from the rows, no routing
    passes). The forget examples are split into unpredictable and kept tokens as the
    trainer splits them (``forget_tokens="unpredictable"``, the default)."""
    from alter import methods, train
    from alter.data import IGNORE_INDEX
    from alter.training.args import UnlearnArgs

    config, _, (batch, seq) = _model_config(dev, quick)
    model, _, _ = _build_model(dev, quick, "base")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    prompt = seq // 4
    examples = [
        {"input_ids": row.tolist(), "attention_mask": [1] * seq,
         "labels": [IGNORE_INDEX] * prompt + row[prompt:].tolist()}
        for row in ids
    ]
    half = max(batch // 2, 1)
    forget, retain = examples[:half], examples[half:] or examples[:half]
    autocast = train._autocast_factory(dev, dev.type == "cuda")
    alter_config = dataclasses.replace(_bench_alter_config(backend_variant, "prepass"), routing=routing)
    args = UnlearnArgs(method=method, config=alter_config, batch_size=half)
    objective = methods.build(args, autocast)
    forget = objective.select_forget_tokens(forget, retain)
    optimizer, forget, retain = objective.setup(model, forget, retain, 0)
    forget_batch = train._batch(forget, range(len(forget)), 0, dev)
    retain_batch = train._batch(retain, range(len(retain)), 0, dev)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        objective.step(model, forget_batch, retain_batch)
        optimizer.step()

    return step


def _train_step_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    """The ALTER step (per-token routers) on the eager path and the dispatcher's choice
    (kernels), and the step cost of ALTER on its defaults (the sequence route, the forget
    tokens the retain rows do not predict) and with the per-token routers, against an
    ``asym_lora`` step on its defaults (issue 18: <= 1.25x, the paper's Fig. 6 ratio; all
    on the dispatcher's choice, so the ratio is the method's cost)."""
    what = "Llama-3-8B x2 layers" if device.type == "cuda" else "tiny Llama"
    _, _, (batch, seq) = _model_config(device, quick)

    def backends(variant, dev):
        return _train_step(dev, quick, "alter", variant)

    def method_cost(variant, dev):
        method, _, routing = variant.partition("-")
        return _train_step(dev, quick, method, "kernels", routing or None)

    return [BenchCase(f"ALTER train step {what} [{batch}x{seq}]", "train_step", ("eager", "kernels"), backends,
                      tokens=batch * seq),
            BenchCase(f"step cost, ALTER vs asym_lora {what} [{batch}x{seq}]", "train_step",
                      ("asym_lora", "alter", "alter-token"), method_cost, tokens=batch * seq)]


def _inference_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    """Prefill and greedy decoding of a patched model against the unpatched model
    (``base``, the baseline): prefill with the entropy prepass (the default) and with the
    entropy given (the adapters' own cost); generation with ``lagged`` entropy (a prepass
    for the prompt, then each token gated by the last logits' entropy) and with the
    default ``prepass`` (the base model decodes beside it, on its own KV cache); one
    decode step with a KV cache (tokens per second of decoding, no prompt). The
    "sequence route" cases run an adapter as ``unlearn`` saves it (``routing="sequence"``,
    lagged entropy): the route gates, so no call computes an entropy."""
    _, _, (batch, seq) = _model_config(device, quick)
    prompt_len = min(16, seq)
    new_tokens = 8 if quick else 32

    def prefill(given_entropy=False, entropy_source="prepass", sequence_route=False):
        def build(variant, dev):
            model, _, input_ids = _build_model(dev, quick, variant, entropy_source=entropy_source,
                                               sequence_route=sequence_route)
            model.eval()
            entropy = torch.rand(input_ids.shape, device=dev) * 3

            def step():
                with torch.no_grad():
                    if given_entropy and variant != "base":
                        with precomputed_entropy(model, entropy):
                            model(input_ids)
                    else:
                        model(input_ids)

            return step

        return build

    def decode(entropy_source, sequence_route=False):
        def build(variant, dev):
            model, _, input_ids = _build_model(dev, quick, variant, entropy_source=entropy_source,
                                               sequence_route=sequence_route)
            model.eval()
            prompt = input_ids[:, :prompt_len]

            def step():
                with torch.no_grad():
                    model.generate(
                        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id,
                    )

            return step

        return build

    def decode_step(variant, dev):
        model, _, input_ids = _build_model(dev, quick, variant, entropy_source="lagged")
        model.eval()
        with torch.no_grad():
            out = model(input_ids[:, :prompt_len], use_cache=True)
        # transformers >= 5 names the cache "cache" (earlier: "past_key_values")
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache, next_ids = getattr(out, key), out.logits[:, -1:].argmax(-1)
        tracker = getattr(model, "alter_tracker", None)
        lagged = None if tracker is None else tracker.lagged.entropy

        def step():
            with torch.no_grad():
                model(next_ids, **{key: cache}, use_cache=True)
            cache.crop(prompt_len - cache.get_seq_length())  # < 0: drop the new token; each step decodes one position
            if tracker is not None:  # the crop undid the step: the next one is gated as this one was
                tracker.lagged.link(cache, lagged)

        return step

    variants = ("base", "eager", "kernels")
    return [
        BenchCase(f"prefill [{batch}x{seq}]", "inference", variants, prefill(), tokens=batch * seq),
        BenchCase(f"prefill entropy given [{batch}x{seq}]", "inference", variants, prefill(True), tokens=batch * seq),
        BenchCase(f"decode {new_tokens} tokens x{batch} (prompt {prompt_len})", "inference", variants,
                  decode("lagged"), tokens=batch * new_tokens),
        BenchCase(f"decode default prepass {new_tokens} tokens x{batch} (prompt {prompt_len})", "inference",
                  variants, decode("prepass"), tokens=batch * new_tokens),
        BenchCase(f"decode step x{batch} (cache {prompt_len})", "inference", variants, decode_step, tokens=batch),
        BenchCase(f"prefill sequence route [{batch}x{seq}]", "inference", variants,
                  prefill(entropy_source="lagged", sequence_route=True), tokens=batch * seq),
        BenchCase(f"decode sequence route {new_tokens} tokens x{batch} (prompt {prompt_len})", "inference", variants,
                  decode("lagged", True), tokens=batch * new_tokens),
    ]


def model_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    return [*_train_step_cases(device, quick), *_inference_cases(device, quick)]

