"""Tokenizers, tiny models, training loop and metrics for the outside check.

Everything the check measures is computed here, from the model's logits and greedy
generations, without the library's metrics: this module deliberately shares no code with
``alter.evaluation.facts`` or ``alter.quality`` (nor imports ``alter`` at all), so that a
bug or a tuned choice there cannot make the library look better here.

Metrics:
  value-token accuracy: share of the tokens of each fact's value that the model predicts
    (argmax) given the text before them;
  value log-prob sum: per fact, the summed log-probability of its value tokens; forget
    quality is the KS-test p-value between these sums on the unlearned model and on the
    oracle (the TOFU convention; high = indistinguishable from the oracle);
  generation hits / typed answers: share of greedy continuations that contain the true
    value / any value of the attribute's pool (a well-formed answer of the right type:
    the oracle gives one nearly always, a model that babbles does not).
"""
import math
import re

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def qa_text(q, a=None):
    """The library's documented plain QA format (help(alter.format_qa)), written out here."""
    s = f"Question: {q}\nAnswer:"
    return s if a is None else s + " " + a


def _wrap(tok):
    # BOS on every encoding, as the models are trained; no EOS (encode_fact adds it to training rows).
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_tokenizer(kind, corpus, vocab_size=None):
    """A tokenizer trained on the scenario's own text.

    kind: "word" (one token per word: values are single tokens), "bpe_meta" (SentencePiece-like
    BPE) or "bpe_byte" (GPT-2-like byte-level BPE): the last two split values into several
    tokens, with and without a leading-space marker.
    """
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tr = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1, vocab_size=100000)
    elif kind == "bpe_meta":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    elif kind == "bpe_byte":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.train_from_iterator(corpus, tr)
    return _wrap(tok)


def make_model(arch, tokenizer, hidden, layers, heads, kv, inter, seed):
    """A randomly initialised tiny Llama or Qwen2 (the same init for target and oracle)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
              tie_word_embeddings=False)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(**kw))
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        return Qwen2ForCausalLM(Qwen2Config(**kw))
    raise ValueError(f"unknown arch {arch!r}; choose llama or qwen2")


def value_span(text, value):
    """Character span of the last whole-word occurrence of value in text."""
    ms = list(re.finditer(r"(?<!\w)" + re.escape(value) + r"(?!\w)", text))
    if not ms:
        raise ValueError(f"value {value!r} not in {text!r}")
    return ms[-1].start(), ms[-1].end()


def encode_fact(tokenizer, text, value, add_eos=True):
    """ids (BOS + text [+ EOS]) and the positions of the tokens overlapping the value's characters."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    s, e = value_span(text, value)
    pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < e and b > s]
    if not pos or pos[0] == 0:
        raise ValueError(f"no value tokens after BOS for {value!r} in {text!r}")
    if add_eos:
        ids.append(tokenizer.eos_token_id)
    return ids, pos


@torch.no_grad()
def score_facts(model, items):
    """items: (ids, value_positions) pairs. Per fact: (n value tokens predicted, n value tokens, log-prob sum)."""
    model.eval()
    out = []
    for ids, pos in items:
        x = torch.tensor([ids])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        p = torch.tensor(pos)
        tgt = x[0, p]
        pred = logits[p - 1].argmax(-1)
        out.append((int((pred == tgt).sum()), len(pos), float(lp[p - 1, tgt].sum())))
    return out


def acc(scores):
    """Value-token accuracy pooled over facts (token-weighted)."""
    return sum(s[0] for s in scores) / max(sum(s[1] for s in scores), 1)


def _norm(s):
    # Compare without whitespace and case: decoders differ in the spaces they put back.
    return re.sub(r"\s+", "", s).lower()


@torch.no_grad()
def generation_hits(model, tokenizer, facts, pools, phrasing="qa", max_new_tokens=12):
    """(hit rate, typed-answer rate, up to 4 samples) of greedy continuations.

    phrasing "qa" prompts with the question; "st" with the statement up to its value.
    """
    model.eval()
    hits, typed, samples = 0, 0, []
    for f in facts:
        if phrasing == "qa":
            prompt = qa_text(f["question"])
        else:
            s, _ = value_span(f["statement"], f["value"])
            prompt = f["statement"][:s].rstrip()
        x = tokenizer(prompt, return_tensors="pt")
        g = model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], do_sample=False,
                           max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
        cont = tokenizer.decode(g[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += _norm(f["value"]) in _norm(cont)
        typed += any(_norm(v) in _norm(cont) for v in pools[f["attr"]])
        if len(samples) < 4:
            samples.append((prompt, f["value"], cont))
    n = max(len(facts), 1)
    return hits / n, typed / n, samples


def train_lm(model, seqs, epochs, seed, lr=3e-3, batch=32, pad_id=0, eval_fn=None, eval_every=10,
             stop_at=None, log=print):
    """Whole-sequence next-token loss (pad masked); returns the epochs run.

    A fixed seed fixes the data order, so the oracle sees its rows in a comparable order.
    With eval_fn and stop_at, stops after the first eval at or above stop_at (the target
    is trained just until it has memorised its facts; the oracle then gets the same epochs).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    n = len(seqs)
    total = math.ceil(n / batch) * epochs
    warm = min(100, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warm, 1)))
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g).tolist()
        for b in range(0, n, batch):
            chunk = [seqs[i] for i in perm[b:b + batch]]
            L = max(len(s) for s in chunk)
            x = torch.full((len(chunk), L), pad_id)
            m = torch.zeros((len(chunk), L), dtype=torch.long)
            for i, s in enumerate(chunk):
                x[i, :len(s)] = torch.tensor(s)
                m[i, :len(s)] = 1
            loss = model(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if eval_fn is not None and (ep + 1) % eval_every == 0:
            a = eval_fn(model)
            log(f"  epoch {ep + 1} loss {loss.item():.4f} value-acc {a:.4f}")
            if stop_at is not None and a >= stop_at:
                model.eval()
                return ep + 1
    model.eval()
    return epochs
