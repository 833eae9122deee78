"""entropy_source="lagged": model.generate with the KV cache against a decode written out
step by step without a cache, each token gated by the entropy that produced it."""
import copy

import torch

from alter.model import alter_layers, apply_alter, disable_adapters, precomputed_entropy
from test_model import alter_config, randomize_adapters, tiny_model, tokens, tsallis64

PROMPT, NEW = 6, 5


def generate(model, prompt):
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW,
        min_new_tokens=NEW,  # no early stop at eos: every step is compared
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


def test_lagged_generation_with_cache_equals_manual_gated_decode():
    model = apply_alter(tiny_model(), alter_config(entropy_source="lagged"))
    randomize_adapters(model, 0.5)
    prompt = tokens(seq=PROMPT)
    out = generate(model, prompt)
    assert out.sequences.shape == (2, PROMPT + NEW)
    last_decode = model.alter_tracker.last_call

    # Manual decode, no cache, over generate's own tokens: the prompt is gated by the base
    # model's entropy, generated token i by the entropy of the logits that produced it.
    with disable_adapters(model):
        entropies = [tsallis64(model(input_ids=prompt).logits)]
    for step in range(NEW):
        with precomputed_entropy(model, torch.cat(entropies, dim=1).float()):
            logits = model(input_ids=out.sequences[:, : PROMPT + step]).logits[:, -1]
        # The same function computed with and without the KV cache: fp32 rounding only.
        torch.testing.assert_close(out.logits[step], logits, rtol=1e-4, atol=1e-4)
        entropies.append(tsallis64(logits)[:, None])
    used = torch.cat(entropies[:-1], dim=1)
    assert (used > 1.2).any() and (used <= 1.2).any()  # both routing branches ran

    tracker = model.alter_tracker
    torch.testing.assert_close(tracker.lagged_entropy.double(), tsallis64(out.logits[-1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_decode.entropy.double(), tsallis64(out.logits[-2])[:, None], rtol=1e-5, atol=1e-5)


def test_fresh_lagged_adapter_generates_what_the_base_model_generates():
    model = tiny_model()
    base = copy.deepcopy(model)
    apply_alter(model, alter_config(entropy_source="lagged"))
    with torch.no_grad():
        for layer in alter_layers(model).values():
            layer.router.weight.normal_()  # routing runs; B = 0 keeps the output exact
    prompt = tokens(seq=PROMPT)
    out, expected = generate(model, prompt), generate(base, prompt)
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.logits, expected.logits):
        # Not bit-equal: the prefill's lm_head reads a slice whose memory alignment differs
        # between the two models, and CPU BLAS picks its kernel by alignment (~2e-6 seen).
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tracker = model.alter_tracker
    torch.testing.assert_close(tracker.lagged_entropy.double(), tsallis64(out.logits[-1]), rtol=1e-5, atol=1e-5)


def test_lagged_entropy_from_a_tuple_output_with_a_loss():
    """return_dict=False with labels returns (loss, logits, ...): the lagged entropy is
    that of the logits, not an index error on the 0-d loss."""
    model = apply_alter(tiny_model(), alter_config(entropy_source="lagged"))
    ids = tokens()
    loss, logits = model(input_ids=ids, labels=ids, return_dict=False)[:2]
    assert loss.dim() == 0
    # float32 entropy kernel against the float64 formula.
    torch.testing.assert_close(model.alter_tracker.lagged_entropy.double(), tsallis64(logits[:, -1]), rtol=1e-5, atol=1e-5)
