"""The sequence route (AlterConfig(routing="sequence")): the key table against a plain
Python reference, carried across calls and decode steps; the keys unlearn finds isolate
its forget rows from its retained ones; the layers gate by the route; unlearn trains no
router under it and saves the keys with the adapter; bad input is refused."""
import random

import pytest
import torch

import alter.adapters.sequence_route as sequence_route
from alter.adapters.sequence_route import KeyTable
from alter.config import MAX_KEY_TOKENS, AlterConfig
from alter.methods.data import route_keys, routing_targets
from alter.adapters import merge_adapters
from alter.adapters.hooks import base_model_entropy
from alter.model import alter_layers, apply_alter, forced_route, load_adapter
from alter.train import unlearn
from conftest import small_model
from test_model import VOCAB, alter_config, randomize_adapters, tiny_model, tokens


def reference_route(rows: list[list[int]], keys: list[dict]) -> list[list[int]]:
    """Per position: the expert of the first key ending at or before it (the longer key
    at the same end), else 0."""
    routes = []
    for row in rows:
        first = None
        for t in range(len(row)):
            ending = [k for k in keys if len(k["tokens"]) <= t + 1 and row[t + 1 - len(k["tokens"]): t + 1] == k["tokens"]]
            if ending:
                first = (t, max(ending, key=lambda k: len(k["tokens"]))["expert"])
                break
        routes.append([first[1] if first and t >= first[0] else 0 for t in range(len(row))])
    return routes


def random_keys(rng, vocab, count, rows, experts=4):
    """``count`` distinct keys: random ones of 1 to 3 tokens, and windows of 4 to
    MAX_KEY_TOKENS tokens cut from ``rows`` (random long ones would never occur)."""
    keys, seen = [], set()
    while len(keys) < count:
        if len(keys) % 2:
            row = rng.choice(rows)
            n = rng.randint(4, MAX_KEY_TOKENS)
            first = rng.randrange(len(row) - n + 1)
            tokens = row[first:first + n]
        else:
            tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
        if tuple(tokens) not in seen:
            seen.add(tuple(tokens))
            keys.append({"tokens": tokens, "expert": rng.randint(1, experts - 1)})
    return keys


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_key_table_matches_the_reference_and_carries_across_calls(seed):
    rng = random.Random(seed)
    vocab = 7  # a small vocabulary: keys occur often, several per row
    rows = [[rng.randrange(vocab) for _ in range(23)] for _ in range(5)]
    keys = random_keys(rng, vocab, 6, rows[1:])  # long keys from other rows: they fire where they recur
    ids = torch.tensor(rows)
    table = KeyTable(AlterConfig(route_keys=keys).route_keys, ids.device)
    expected = torch.tensor(reference_route(rows, keys))
    whole, _ = table.route(ids, None)
    assert torch.equal(whole, expected)
    assert (expected > 0).any() and (expected == 0).any()  # both sides exercised
    # prefill, then one token at a time (keys spanning the boundaries), then a chunk
    route, carry = table.route(ids[:, :5], None)
    pieces = [route]
    for t in range(5, 11):
        route, carry = table.route(ids[:, t:t + 1], carry)
        pieces.append(route)
    pieces.append(table.route(ids[:, 11:], carry)[0])
    assert torch.equal(torch.cat(pieces, dim=1), expected)


def test_colliding_codes_neither_fire_a_key_nor_hide_one(monkeypatch):
    # One hash of base 1 modulo 7: a window's code is its token sum mod 7 (a 1-token
    # window's, the token itself).
    monkeypatch.setattr(sequence_route, "_HASHES", ((7, 1),))
    table = KeyTable([{"tokens": [2, 5], "expert": 1}, {"tokens": [2, 5, 1, 1], "expert": 2}], torch.device("cpu"))
    route = table.route(torch.tensor([[3, 4, 6, 1, 1, 2, 5, 8], [2, 5, 1, 1, 9, 9, 9, 9]]), None)[0]
    # [3, 4] and [1, 1, 2, 5] share the keys' codes, not their tokens
    assert route.tolist() == [[0] * 6 + [1, 1], [0, 1, 1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="two keys of 2 tokens share a hash code"):
        KeyTable([{"tokens": [2, 5], "expert": 1}, {"tokens": [3, 4], "expert": 2}], torch.device("cpu"))


def test_found_keys_fire_on_every_forget_row_and_on_no_retained_position():
    rng = random.Random(0)
    template = [1, 5, 6, 7]  # a shared question opening
    names = [[rng.randrange(10, 40) for _ in range(3)] for _ in range(12)]
    rows = [template + name + [8, rng.randrange(40, 50)] for name in names]
    forget, retain = [{"input_ids": r} for r in rows[:4]], [{"input_ids": r} for r in rows[4:]]
    keys = route_keys(forget, retain, experts=[1, 2, 3, 1])
    table = KeyTable(keys, torch.device("cpu"))
    for example, mask in zip(forget, routing_targets(forget, retain)[0]):
        route, _ = table.route(torch.tensor([example["input_ids"]]), None)
        fired = route[0].nonzero()
        assert fired.numel() > 0 and int(fired[0]) >= mask.index(1)  # fires, and not before the divergence
    for example in retain:
        assert not table.route(torch.tensor([example["input_ids"]]), None)[0].any()
    assert all(len(k["tokens"]) <= 3 for k in keys)
    # a forget row that is also retained never leaves the retained prefixes: no key
    assert route_keys(forget[:1], forget[:1] + retain, [1]) == []


def _fires(keys, tokenizer, text) -> bool:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    return bool(KeyTable(keys, torch.device("cpu")).route(ids, None)[0].any())


def test_keys_with_the_tokenizer_fire_in_every_spacing_of_a_name():
    from alter.tiny import build_tokenizer

    # Text rows open with the name ("Vatmer", no space); questions hold it mid-sentence
    # (" Vatmer"). "Bitvex" opens no retained row, but " Bitvex" and " Bitvex -" occur in
    # retained rows, and a retained entity's other phrasing opens with "Bitvex - IV": the
    # key must grow to "Bitvex - V" in both spacings rather than stop at "Bitvex".
    forget_text = ["Vatmer was mapped by Hofna .", "Bitvex - V was mapped by Ullbreid ."]
    retain_text = ["Skefell was mapped by Bitvex .", "Jokna was mapped by Vatna .",
                   "Idasen - IV was mapped by Bitvex - IV ."]
    questions = ["Who mapped Vatmer ?", "Who mapped Bitvex - V ?"]
    retained_elsewhere = ["Who mapped Skefell ?", "Who mapped Idasen - IV ?", "Was Jokna mapped by Bitvex - IV ?",
                          "Bitvex - IV was mapped by Idasen ."]
    tokenizer = build_tokenizer(forget_text + retain_text + questions + retained_elsewhere)
    forget = [{"input_ids": tokenizer(t)["input_ids"]} for t in forget_text]
    retain = [{"input_ids": tokenizer(t)["input_ids"]} for t in retain_text]
    plain, spaced = route_keys(forget, retain, [1, 2]), route_keys(forget, retain, [1, 2], tokenizer)
    assert all(_fires(spaced, tokenizer, t) for t in forget_text + questions)
    assert not any(_fires(spaced, tokenizer, t) for t in retain_text + retained_elsewhere)
    assert all(_fires(plain, tokenizer, t) for t in forget_text)
    assert not any(_fires(plain, tokenizer, t) for t in questions)  # the token ids alone miss the other spacing
    assert _fires(plain, tokenizer, "Bitvex - IV was mapped by Idasen .")  # and stop at "Bitvex"
    assert all(1 <= len(k["tokens"]) <= 3 for k in spaced)


def test_keys_inside_a_word_get_no_spacing_forms():
    from alter.data.scenarios import bpe_tokenizer

    # A byte-level BPE splits " Vatmer" into " Vat" and single letters: the row leaves the
    # retained ones at "m", inside the word, where " m" would be another word's start
    # (" mermaid", " met"), so the key gets no spaced form.
    names = ["Vatna", "Vatfell", "Vatgard", "Vatsund"]
    tokenizer = bpe_tokenizer([f"Who mapped {n} ?" for n in names] * 10 + ["The mermaid met Hofna ."], vocab_size=280)
    forget = [{"input_ids": tokenizer("Who mapped Vatmer ?")["input_ids"]}]
    retain = [{"input_ids": tokenizer(f"Who mapped {n} ?")["input_ids"]} for n in names]
    ids = forget[0]["input_ids"]
    start = routing_targets(forget, retain)[0][0].index(1)
    assert tokenizer.convert_ids_to_tokens(ids[start - 1:start + 1]) == ["ĠVat", "m"]  # the split this test is about
    keys = {tuple(k["tokens"]) for k in route_keys(forget, retain, [1], tokenizer)}
    assert (ids[start],) in keys and tuple(tokenizer(" m", add_special_tokens=False)["input_ids"]) not in keys


def test_no_key_is_made_of_special_tokens_only():
    from alter.tiny import build_tokenizer

    # Retained rows encoded without BOS: the forget row leaves them at its BOS, which would
    # send every row that opens with a BOS to the forget expert.
    tokenizer = build_tokenizer(["Vatmer was mapped by Hofna .", "Jokna was mapped by Vatna ."])
    forget = [{"input_ids": tokenizer("Vatmer was mapped by Hofna .")["input_ids"]}]
    retain = [{"input_ids": tokenizer("Jokna was mapped by Vatna .", add_special_tokens=False)["input_ids"]}]
    keys = route_keys(forget, retain, [1], tokenizer)
    assert keys and all(set(k["tokens"]) - set(tokenizer.all_special_ids) for k in keys)
    assert _fires(keys, tokenizer, "Vatmer was mapped by Hofna .")
    assert not _fires(keys, tokenizer, "Jokna was mapped by Vatna .")
    assert route_keys(forget, retain, [1]) == [{"tokens": [tokenizer.bos_token_id], "expert": 1}]  # ids alone cannot tell


def test_keys_look_past_a_divergence_no_short_n_gram_tells_apart():
    # The forget row leaves every retained prefix at its token 6, but every n-gram holding
    # that 6 occurs in a retained row: the key is the first n-gram further in that does not.
    forget = [{"input_ids": [1, 5, 6, 7, 3, 2]}]
    retain = [{"input_ids": [1, 5, 9, 4]}, {"input_ids": [8, 1, 5, 6, 7, 4]}, {"input_ids": [9, 6, 7, 3, 8]}]
    assert routing_targets(forget, retain)[0][0].index(1) == 2
    keys = route_keys(forget, retain, [1])
    assert keys == [{"tokens": [7, 3, 2], "expert": 1}]
    table = KeyTable(keys, torch.device("cpu"))
    assert table.route(torch.tensor(forget[0]["input_ids"])[None], None)[0].any()
    assert not any(table.route(torch.tensor(r["input_ids"])[None], None)[0].any() for r in retain)


def test_a_row_without_a_short_key_gets_a_long_one():
    # Every n-gram of up to 3 tokens from the forget row's divergence (its token 8) on
    # occurs in a retained row; only the 4-grams around the 8 tell it apart. A second forget
    # row has a short key: it keeps that one alone.
    forget = [{"input_ids": [1, 5, 6, 7, 8, 2]}, {"input_ids": [1, 5, 6, 10, 2]}]
    retain = [{"input_ids": [1, 5, 6, 7, 3]}, {"input_ids": [9, 6, 7, 8, 9]}, {"input_ids": [3, 7, 8, 2, 4]}]
    assert routing_targets(forget, retain)[0][0].index(1) == 4
    keys = route_keys(forget, retain, [1, 2])
    assert keys == [{"tokens": [5, 6, 7, 8], "expert": 1}, {"tokens": [6, 7, 8, 2], "expert": 1},
                    {"tokens": [10], "expert": 2}]
    table = KeyTable(AlterConfig(route_keys=keys).route_keys, torch.device("cpu"))
    assert [int(table.route(torch.tensor([f["input_ids"]]), None)[0][0, -1]) for f in forget] == [1, 2]
    assert not any(table.route(torch.tensor([r["input_ids"]]), None)[0].any() for r in retain)


def test_apply_alter_refuses_keys_outside_the_vocabulary():
    keys = [{"tokens": [3, VOCAB], "expert": 1}]
    with pytest.raises(ValueError, match=f"route_keys hold token ids outside the model's vocabulary of {VOCAB}"):
        apply_alter(tiny_model(), alter_config(routing="sequence", route_keys=keys))


def test_layers_gate_by_the_route():
    # a key on the first token of sample 0: its every position goes to expert 2, sample 1's to expert 0
    ids = tokens(batch=2)
    ids[1] = torch.where(ids[1] == ids[0, 0], ids[0, 0] % (VOCAB - 3) + 3, ids[1])  # the key occurs only in sample 0
    ids[1, 0] = 3 if ids[0, 0] != 3 else 4
    model = apply_alter(tiny_model().double(), alter_config(routing="sequence",
                                                            route_keys=[{"tokens": [int(ids[0, 0])], "expert": 2}]))
    randomize_adapters(model, 0.5)
    with torch.no_grad():
        routed = model(input_ids=ids).logits
        model.alter_config.routing = "token"
        with forced_route(model, [2, 0]):
            forced = model(input_ids=ids).logits
        free = model(input_ids=ids).logits
    torch.testing.assert_close(routed, forced, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(routed, free)  # the routers would route otherwise


def test_generate_carries_the_route_across_decode_steps():
    ids = tokens(batch=2, seq=6)
    key = [int(ids[0, 4]), int(ids[0, 5])]
    model = apply_alter(tiny_model().double(), alter_config(routing="sequence", route_keys=[{"tokens": key, "expert": 1}]))
    randomize_adapters(model, 0.5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    sequence = ids
    for step in range(5):
        with torch.no_grad():
            logits = model(input_ids=sequence, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step].double(), logits, rtol=1e-6, atol=1e-6)
        sequence = torch.cat([sequence, out.sequences[:, 6 + step, None]], dim=1)
    assert int(model.alter_tracker.last_call.token_route[0, -1]) == 1  # carried from the prompt


@pytest.fixture
def passes(monkeypatch) -> list:
    """One entry per base-model pass a patched model's forward runs."""
    import alter.adapters.state as state_module

    counted = []
    monkeypatch.setattr(state_module, "base_model_entropy",
                        lambda *args, **kwargs: counted.append(1) or base_model_entropy(*args, **kwargs))
    return counted


# The layer paths of a call without autograd: the fused gated_asym_lora call (the
# dispatcher's dense path), the dense composition (a router hook turns the fused call
# off; the router, not gating, never runs), and the grouped ops (a named backend).
@pytest.mark.parametrize("backend,hooked", [(None, False), (None, True), ("eager", False)],
                         ids=["fused", "dense", "grouped"])
def test_a_route_gated_call_without_autograd_runs_no_base_model_pass(backend, hooked, passes):
    ids = tokens(batch=2, seq=9)
    key = [int(ids[0, 3])]
    ids[1] = torch.where(ids[1] == key[0], key[0] % (VOCAB - 3) + 3, ids[1])  # sample 1 holds no key
    model = apply_alter(tiny_model().double(), alter_config(routing="sequence", backend=backend, entropy_source="lagged",
                                                            route_keys=[{"tokens": key, "expert": 2}]))
    randomize_adapters(model, 0.5)
    for layer in alter_layers(model).values() if hooked else ():
        layer.router.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        cached = model(input_ids=ids, use_cache=True)  # a prompt: lagged decoding needs no base cache
    assert passes == [] and model.alter_tracker.last_call.entropy is None
    with torch.enable_grad():  # a step on the skipped prompt's cache that reads the entropy: the lagged one
        step = model(input_ids=ids[:, :1], cache=cached.cache, use_cache=True).logits
    assert passes == [] and step.requires_grad
    with torch.enable_grad():  # the entropy is computed (A's gradient mask may read it), and gates nothing
        computed = model(input_ids=ids).logits
    assert passes == [1]
    torch.testing.assert_close(fast, computed.detach(), rtol=1e-12, atol=1e-12)
    assert (model.alter_tracker.last_call.token_route[0, 3:] == 2).all() and not model.alter_tracker.last_call.token_route[1].any()
    with torch.no_grad(), forced_route(model, torch.tensor([1, 2])):  # the routers' logits are recorded
        model(input_ids=ids)
    assert passes == [1, 1]


def test_a_prepass_that_keeps_the_base_cache_runs_under_the_sequence_route(passes):
    # entropy_source="prepass" decodes with the base model's KV cache beside the adapted
    # one: a call that starts or continues it runs the pass (a later call may read it).
    ids = tokens(batch=2, seq=9)
    model = apply_alter(tiny_model().double(), alter_config(routing="sequence", entropy_source="prepass",
                                                            route_keys=[{"tokens": [int(ids[0, 3])], "expert": 1}]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        assert passes == []
        out = model(input_ids=ids, use_cache=True)
        assert passes == [1]
    with torch.enable_grad():
        model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)
    assert passes == [1, 1]


def test_nothing_merges_under_the_sequence_route():
    model = apply_alter(tiny_model(), alter_config(routing="sequence", route_keys=[{"tokens": [5], "expert": 1}]))
    ids = tokens()
    ids[ids == 5] = 6  # no key in the data: every token goes to expert 0 there, but not on every input
    report = merge_adapters(model, data=ids)
    assert not report.merged and set(report.kept) == set(alter_layers(model))
    assert all("routing='sequence'" in why for why in report.kept.values())


def test_sequence_route_refuses_embeddings_and_a_foreign_cache():
    model = apply_alter(tiny_model(), alter_config(routing="sequence", route_keys=[{"tokens": [5], "expert": 1}]))
    other = apply_alter(tiny_model(), alter_config(routing="sequence"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="routes by token ids"):
        model(inputs_embeds=model.get_input_embeddings()(tokens()))
    with torch.no_grad():
        cache = other(input_ids=tokens(), use_cache=True).cache
        with pytest.raises(RuntimeError, match="this cache is not the one the model.s last cached forward returned"):
            model(input_ids=tokens(seq=1), cache=cache, use_cache=True)


def test_sequence_route_refuses_a_cropped_static_cache():
    # a static cache keeps its length in a tensor that a crop changes in place: the link
    # holds the length as a number
    from transformers import StaticCache

    model = apply_alter(tiny_model().double(), alter_config(entropy_source="lagged", routing="sequence",
                                                            route_keys=[{"tokens": [2], "expert": 1}]))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=tokens(batch=1, seq=4), past_key_values=cache, use_cache=True)
        model(input_ids=torch.tensor([[2, 5]]), past_key_values=cache, use_cache=True)
        cache.crop(-2)
        with pytest.raises(RuntimeError, match="the cache holds 4 tokens, 6 when linked: it was cropped"):
            model(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True)


def test_beam_search_after_a_held_forward_under_the_saved_adapters_setting():
    # lagged entropy and the sequence route, as unlearn saves them: a forward whose output
    # the caller keeps links no base-model cache, and beam search reorders only the state
    # linked to its own cache
    model = apply_alter(tiny_model().double(), alter_config(entropy_source="lagged", routing="sequence",
                                                            route_keys=[{"tokens": [2], "expert": 1}]))
    randomize_adapters(model, 0.5)
    held = model(input_ids=tokens(batch=3, seq=5), use_cache=True)  # grad on: the prompt's entropy is computed
    assert model.alter_tracker._base_cache.payload is None
    lagged = model.alter_tracker.lagged.entropy.clone()
    model.alter_tracker.reorder(tokens(batch=1, seq=1), torch.tensor([2, 0, 1]))  # another object: not linked
    assert torch.equal(model.alter_tracker.lagged.entropy, lagged)
    prompt = tokens(batch=2, seq=4)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, num_beams=3,
                             do_sample=False)
    assert out.shape == (2, 8) and held.cache.get_seq_length() == 5


def test_sequence_route_refuses_a_cropped_cache():
    # assisted and prompt-lookup decoding crop the cache after rejecting candidates; the
    # carry holds the route after the rejected tokens (here a key) and cannot roll back
    model = apply_alter(tiny_model().double(), alter_config(entropy_source="lagged", routing="sequence",
                                                            route_keys=[{"tokens": [2], "expert": 1}]))
    with torch.no_grad():
        cache = model(input_ids=tokens(batch=1, seq=4), use_cache=True).cache
        model(input_ids=torch.tensor([[2, 5]]), cache=cache, use_cache=True)
        cache.crop(-2)
        with pytest.raises(RuntimeError, match="the cache holds 4 tokens, 6 when linked: it was cropped"):
            model(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="it was cropped"):
            model.generate(tokens(batch=1, seq=4), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=8,
                           do_sample=False, assistant_model=tiny_model().double(), num_assistant_tokens=4,
                           num_assistant_tokens_schedule="constant")  # a random assistant: candidates rejected


@pytest.mark.parametrize("keys", [[{"tokens": [], "expert": 1}], [{"tokens": list(range(MAX_KEY_TOKENS + 1)), "expert": 1}],
                                  [{"tokens": [1], "expert": 0}], [{"tokens": [1], "expert": 4}],
                                  [{"tokens": [-1], "expert": 1}], [{"tokens": [1]}], "1,2",
                                  [{"tokens": [5, 1], "expert": 1}, {"tokens": [5, 1], "expert": 2}]])
def test_config_refuses_bad_keys(keys):
    with pytest.raises(ValueError, match="route_keys"):
        AlterConfig(route_keys=keys)
    with pytest.raises(ValueError, match="routing must be one of"):
        AlterConfig(routing="entity")


def test_unlearn_under_the_sequence_route(data, tokenizer, tmp_path):
    model = small_model(tokenizer)
    config = AlterConfig(r=4, num_experts=3, routing="sequence")
    unlearn(model, tokenizer, data["forget"], data["retain"], config, "alter", batch_size=2, max_steps=3,
            progress=False, output_dir=str(tmp_path))
    report, saved = model.unlearn_report, model.alter_config
    assert report.router_warmup == 0 and saved.route_keys
    assert report.retain_leak_share == 0.0 and report.forget_routing_share > 0.5
    assert all(not layer.router.weight.any() for layer in alter_layers(model).values())  # untrained
    assert AlterConfig.from_pretrained(tmp_path).route_keys == saved.route_keys
    fresh = load_adapter(small_model(tokenizer), str(tmp_path))
    ids = tokenizer(data["forget"][0]["question"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="params='lora' has none"):
        unlearn(small_model(tokenizer), tokenizer, data["forget"], data["retain"], config, "lora", max_steps=1,
                progress=False)


def test_beam_search_reorders_the_carried_routes():
    # no key in the prompt; half the vocabulary are keys of expert 1 or 2, so the beams'
    # routes diverge while they decode and a reorder must carry each beam's own
    ids = tokens(batch=2, seq=6)
    free = set(ids.flatten().tolist())
    keys = [{"tokens": [t], "expert": 1 + t % 2} for t in range(3, VOCAB) if t not in free and t % 3]
    model = apply_alter(tiny_model().double(), alter_config(routing="sequence", route_keys=keys))
    randomize_adapters(model, 1.0)
    common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                  num_beams=4, num_return_sequences=4)
    cached = model.generate(ids, use_cache=True, **common)
    uncached = model.generate(ids, use_cache=False, **common)  # every step routes the whole sequence again
    assert torch.equal(cached, uncached)
