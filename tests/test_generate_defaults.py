"""generate() on a model patched with the default AlterConfig() (entropy_source="prepass"):
each decoded token is gated by the base model's entropy at its position, computed with
the base model's own KV cache; the result equals decoding without a cache, where the
prepass runs over the whole sequence at every step. "lagged" decoding runs no base
forward after the prompt."""
import pytest
import torch

from alter.model import apply_alter
from test_model import alter_config, randomize_adapters, tiny_model, tokens

PROMPT, NEW = 6, 5


@pytest.mark.parametrize("backend", [None, "eager"])
def test_default_generate_equals_decoding_without_a_cache(backend):
    # float64: tau_low = 0.01 would turn float32 rounding (cache or not) into 1e-4 differences
    model = apply_alter(tiny_model().double(), alter_config(backend=backend))
    assert model.alter_config.entropy_source == "prepass"
    randomize_adapters(model, 0.5)
    prompt = tokens(seq=PROMPT)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    sequence = prompt
    for step in range(NEW):
        with torch.no_grad():
            logits = model(input_ids=sequence, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step].double(), logits, rtol=1e-6, atol=1e-6)  # generate keeps float32
        sequence = torch.cat([sequence, out.sequences[:, PROMPT + step, None]], dim=1)
    assert torch.equal(out.sequences, sequence)


def test_prepass_decode_step_after_a_plain_forward_with_a_cache():
    model = apply_alter(tiny_model(), alter_config())
    randomize_adapters(model, 0.5)
    ids = tokens(seq=PROMPT + 1)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[:, -1]
        cache = model(input_ids=ids[:, :-1], use_cache=True).cache
        step = model(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_prepass_refuses_a_cache_filled_elsewhere():
    model = apply_alter(tiny_model(), alter_config())
    other = apply_alter(tiny_model(), alter_config())
    with torch.no_grad():
        cache = other(input_ids=tokens(), use_cache=True).cache
        with pytest.raises(RuntimeError, match="this cache is not the one the model.s last cached forward returned"):
            model(input_ids=tokens(seq=1), cache=cache, use_cache=True)


@pytest.mark.parametrize("source, base_forwards", [("lagged", 0), ("prepass", 1)])
def test_decode_step_runs_a_base_forward_only_under_prepass(source, base_forwards):
    model = apply_alter(tiny_model(), alter_config(entropy_source=source))
    with torch.no_grad():
        out = model(input_ids=tokens(), use_cache=True)
        decoder_calls = []
        model.model.register_forward_pre_hook(lambda module, args: decoder_calls.append(1))
        model(input_ids=tokens(seq=1), cache=out.cache, use_cache=True)
    assert len(decoder_calls) == 1 + base_forwards
