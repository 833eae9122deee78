"""alter.tiny: the word-level tokenizer and the tiny Llama."""
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from alter.data import qa_texts, tofu_mini
from alter.tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_tokenizer, tiny_llama

TEXTS = [
    "Question: Where was Mora Selski born?\nAnswer: Mora Selski was born in Lisbon.",
    "Hamlet was written by William Shakespeare.",
    "The capital of  Peru is Lima, isn't it? (Yes!)",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS)


def test_round_trip_is_exact(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Words and punctuation are tokens; a token carries the space before it.
    assert tokenizer.tokenize("Hamlet was written by William Shakespeare.") == \
        ["Hamlet", " was", " written", " by", " William", " Shakespeare", "."]


def test_round_trip_on_tofu_mini():
    texts = qa_texts(tofu_mini(num_authors=4, facts_per_author=8, seed=1))
    tok = build_tokenizer(texts)
    for text in texts:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_special_tokens_and_unknown_words(tokenizer):
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == 0
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert len({tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id,
                tokenizer.eos_token_id}) == 4
    ids = tokenizer("Hamlet was written by Goethe.")["input_ids"]
    assert ids.count(tokenizer.unk_token_id) == 1
    assert tokenizer.decode(ids) == f"{BOS_TOKEN}Hamlet was written by{UNK_TOKEN}."


def test_vocabulary_is_deterministic(tokenizer):
    assert build_tokenizer(list(TEXTS)).get_vocab() == tokenizer.get_vocab()
    assert build_tokenizer(iter(TEXTS)).get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("loader", [PreTrainedTokenizerFast, AutoTokenizer])
def test_save_and_load(tokenizer, tmp_path, loader):
    tokenizer.save_pretrained(tmp_path)
    loaded = loader.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == \
        (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)


def test_build_tokenizer_rejects_bad_input():
    with pytest.raises(TypeError, match="not one string"):
        build_tokenizer("just one text")
    with pytest.raises(ValueError, match="non-empty"):
        build_tokenizer([])
    with pytest.raises(ValueError, match="strings"):
        build_tokenizer(["ok", 3])


def test_tiny_llama_from_tokenizer(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == \
        (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert config.intermediate_size == 128 and not config.tie_word_embeddings
    ids = torch.tensor([tokenizer("Hamlet was written by William Shakespeare.")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_tiny_llama_is_deterministic_and_keeps_the_global_rng():
    state = torch.random.get_rng_state()
    a, b = tiny_llama(50, hidden_size=16, num_heads=2, seed=1), tiny_llama(50, hidden_size=16, num_heads=2, seed=1)
    c = tiny_llama(50, hidden_size=16, num_heads=2, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tiny_llama_tied_embeddings():
    model = tiny_llama(40, hidden_size=16, num_heads=2, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("args,kwargs,error,match", [
    (("vocab",), {}, TypeError, "tokenizer_or_vocab_size"),
    ((0,), {}, ValueError, "vocab size"),
    ((10,), dict(hidden_size=30, num_heads=4), ValueError, "divisible"),
    ((10,), dict(num_layers=0), ValueError, "num_layers"),
])
def test_tiny_llama_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_llama(*args, **kwargs)


def test_raw_sentences_cover_the_library_prompts():
    # A vocabulary built from bare questions and answers still encodes them inside the
    # prompts of format_qa / format_mcq: every word exists with and without its space.
    from alter.data import format_mcq, format_qa

    tok = build_tokenizer(["Where was Mora Selski born?", "Mora Selski was born in Lisbon."])
    for text in (format_qa("Where was Mora Selski born?", "Mora Selski was born in Lisbon."),
                 format_mcq("Where was Mora Selski born?", ["Lisbon", "Mora", "Selski", "born"]) + " C"):
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
