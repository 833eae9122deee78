"""entropy_source="lagged": model.generate with the KV cache against a decode written out
step by step without a cache, each token gated by the entropy that produced it."""
import copy

import pytest
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
    torch.testing.assert_close(tracker.lagged.entropy.double(), tsallis64(out.logits[-1]), rtol=1e-5, atol=1e-5)
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
    torch.testing.assert_close(tracker.lagged.entropy.double(), tsallis64(out.logits[-1]), rtol=1e-5, atol=1e-5)


def test_lagged_entropy_from_a_tuple_output_with_a_loss():
    """return_dict=False with labels returns (loss, logits, ...): the lagged entropy is
    that of the logits, not an index error on the 0-d loss."""
    model = apply_alter(tiny_model(), alter_config(entropy_source="lagged"))
    ids = tokens()
    loss, logits = model(input_ids=ids, labels=ids, return_dict=False)[:2]
    assert loss.dim() == 0
    # float32 entropy kernel against the float64 formula.
    torch.testing.assert_close(model.alter_tracker.lagged.entropy.double(), tsallis64(logits[:, -1]), rtol=1e-5, atol=1e-5)


BEAMS = 3


def beam_search(model, prompt, **kwargs):
    """Beam search whose ``sequences_scores`` are the sums of the chosen tokens' log-probs
    (length_penalty 0), every step compared (no early stop at eos)."""
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, num_beams=BEAMS, num_return_sequences=BEAMS, length_penalty=0.0,
                          early_stopping=True, output_scores=True, return_dict_in_generate=True, **kwargs)


def reordering(model):
    """The beam indices transformers passes to the model's ``_reorder_cache``."""
    seen, reorder = [], model._reorder_cache

    def spy(cache, beam_idx):
        seen.append(beam_idx.clone())
        return reorder(cache, beam_idx)

    model._reorder_cache = spy
    return seen


def test_lagged_beam_search_gates_each_beam_with_its_parents_entropy():
    # Each returned beam written out without a cache: the prompt gated by the base model's
    # entropy, token i by the entropy of the distribution it was chosen from, the one its
    # parent beam computed. Its score, the sum of its tokens' log-probs, equals beam search's.
    model = apply_alter(tiny_model().double(), alter_config(entropy_source="lagged"))
    randomize_adapters(model, 0.5)
    prompt = tokens(batch=1, seq=PROMPT)
    seen = reordering(model)
    out = beam_search(model, prompt)
    assert any(not torch.equal(idx, torch.arange(BEAMS)) for idx in seen)  # the beams did reorder
    used = []
    for sequence, score in zip(out.sequences, out.sequences_scores):
        with disable_adapters(model):
            entropies = [tsallis64(model(input_ids=prompt).logits)]
        total = 0.0
        for step in range(NEW):
            with precomputed_entropy(model, torch.cat(entropies, dim=1)):
                logits = model(input_ids=sequence[None, : PROMPT + step]).logits[:, -1]
            total += torch.log_softmax(logits, -1)[0, sequence[PROMPT + step]]
            entropies.append(tsallis64(logits)[:, None])
        used.append(torch.cat(entropies[1:-1], dim=1))
        torch.testing.assert_close(score.double(), total, rtol=1e-5, atol=1e-5)
    used = torch.cat(used)
    assert (used > 1.2).any() and (used <= 1.2).any()  # both routing branches ran on decoded tokens


def test_prepass_beam_search_equals_beam_search_without_a_cache():
    # With the cache, the base model's own KV cache is reordered with the beams; without
    # it, every step's prepass runs over the whole sequence.
    model = apply_alter(tiny_model().double(), alter_config())
    randomize_adapters(model, 0.5)
    prompt = tokens(batch=1, seq=PROMPT)
    seen = reordering(model)
    cached = beam_search(model, prompt, use_cache=True)
    assert any(not torch.equal(idx, torch.arange(BEAMS)) for idx in seen)
    uncached = beam_search(model, prompt, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-6, atol=1e-6)


def test_lagged_entropy_belongs_to_the_cache_its_forward_returned():
    model = apply_alter(tiny_model().double(), alter_config(entropy_source="lagged"))
    randomize_adapters(model, 0.5)
    prompt, step = tokens(seq=PROMPT), tokens(seq=1)

    def decode(between=None):
        with torch.no_grad():
            cache = model(input_ids=prompt, use_cache=True).cache
            if between is not None:
                between()
            return model(input_ids=step, cache=cache, use_cache=True).logits

    expected = decode()
    # a forward without a cache in between (scoring) leaves the decode as it was
    torch.testing.assert_close(decode(lambda: model(input_ids=tokens(seq=3), use_cache=False)), expected,
                               rtol=0, atol=0)
    # one that returns another cache (of the same length: the link is to the object) took
    # the model's lagged entropy: the step on the first cache would read the other
    # forward's entropy, so it raises
    with pytest.raises(RuntimeError, match="this cache is not the one the model's last cached forward returned"):
        decode(lambda: model(input_ids=tokens(seq=PROMPT), use_cache=True))
    with torch.no_grad():  # so does a cropped cache (assisted decoding crops)
        cache = model(input_ids=prompt, use_cache=True).cache
        cache.crop(-1)
        with pytest.raises(RuntimeError, match="the cache holds 5 tokens, 6 when linked: it was cropped"):
            model(input_ids=step, cache=cache, use_cache=True)
