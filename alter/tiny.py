"""A built-in tiny language model and word-level tokenizer, for the CPU demo and the tests.

Nothing is downloaded: the tokenizer's vocabulary is built from the texts it will see
(e.g. :func:`alter.data.qa_texts` of :func:`alter.data.tofu_mini`), and the model is a
randomly initialized ``LlamaForCausalLM`` small enough to memorize a few hundred QA pairs
in minutes on two CPU cores.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alter.data import format_mcq, format_qa

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<s>", "</s>"

# A token is a word or a punctuation mark with the space before it, or a lone whitespace
# character. Every character lands in exactly one token, so joining the tokens back
# (the Fuse decoder) restores the text exactly.
_TOKEN_PATTERN = r" ?\w+| ?[^\w\s]|\s"


def _vocabulary(texts: list[str], pre_tokenizer) -> dict[str, int]:
    """Token -> id: the special tokens, then every token of ``texts`` and of the library's
    prompt formats, each word both with and without its leading space, most frequent first
    (ties alphabetical), so the order is deterministic."""
    scaffolds = [format_qa("", ""), format_mcq("", [""] * 4)]
    counts = Counter(token for text in texts + scaffolds for token, _ in pre_tokenizer.pre_tokenize_str(text))
    for token in list(counts):
        word = token[1:] if token.startswith(" ") and len(token) > 1 else token
        if not word.isspace():
            # A word met only at the start of a text still needs its spaced form (and
            # vice versa) once it appears inside a prompt.
            counts.update({word: 0, " " + word: 0})
    tokens = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN] + sorted(counts, key=lambda t: (-counts[t], t))
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation mark of
    ``texts`` (and of the prompts of :func:`alter.data.format_qa` / :func:`alter.data.format_mcq`).

    Tokens are words and punctuation marks with their leading space (``" Paris"``,
    ``"."``), so ``decode(encode(text)) == text`` for text made of known words; each word
    is in the vocabulary both with and without the space. Special tokens: ``<pad>`` (id 0),
    ``<unk>``, ``<s>`` (BOS, prepended by the tokenizer), ``</s>`` (EOS, appended by
    :func:`alter.data.encode_qa`). Save and reload with ``save_pretrained`` /
    ``PreTrainedTokenizerFast.from_pretrained`` (or ``AutoTokenizer``).
    """
    if isinstance(texts, str):
        raise TypeError("build_tokenizer: texts must be an iterable of strings, not one string")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("build_tokenizer: texts must be a non-empty iterable of strings")
    pre_tokenizer = pre_tokenizers.Split(Regex(_TOKEN_PATTERN), behavior="isolated")
    vocab = _vocabulary(texts, pre_tokenizer)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False)


def tiny_llama(tokenizer_or_vocab_size, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
               intermediate_size: int | None = None, max_position_embeddings: int = 256,
               tie_word_embeddings: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialized small ``LlamaForCausalLM`` (float32, on the CPU).

    ``tokenizer_or_vocab_size``: a tokenizer (its vocabulary size and pad/BOS/EOS ids are
    used) or a vocabulary size. ``intermediate_size`` defaults to ``4 * hidden_size``. The
    defaults (about 0.5M parameters besides the embeddings) memorize :func:`tofu_mini` in a
    few minutes on two CPU cores. Initialization is deterministic given ``seed`` and leaves
    the global RNG untouched.
    """
    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, special_ids = tokenizer_or_vocab_size, {}
    elif hasattr(tokenizer_or_vocab_size, "convert_tokens_to_ids"):
        tok = tokenizer_or_vocab_size
        vocab_size = len(tok)
        special_ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                       "eos_token_id": tok.eos_token_id}
    else:
        raise TypeError("tiny_llama: tokenizer_or_vocab_size must be a tokenizer or an int, "
                        f"got {type(tokenizer_or_vocab_size).__name__}")
    for name, value in (("vocab size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("num_heads", num_heads), ("max_position_embeddings", max_position_embeddings)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"tiny_llama: {name} must be a positive int, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"tiny_llama: hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        **special_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
