"""Data preparation of an unlearning run: checking and encoding the forget and retain sets,
batching, the base-model pass (entropy cache, k-means features), routing targets, and
the data order (a pure function of seed and step)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from tqdm.auto import tqdm

from alter.config import MAX_KEY_TOKENS, SHORT_KEY_TOKENS
from alter.data import collate, collated_batches, encode_qa, encode_text
from alter.methods.losses import sequence_logprob
from alter.adapters import evaluating, is_patched, precomputed_entropy
from alter_kernels import tsallis_entropy


def check_dataset(data, name: str) -> list[str]:
    """Raise a clear error unless ``data`` is a non-empty ``datasets.Dataset`` of usable
    QA or text rows (see :func:`check_rows`); returns each row's kind."""
    import datasets

    if not isinstance(data, datasets.Dataset):
        raise TypeError(f"{name} must be a datasets.Dataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty: unlearning needs at least one example")
    columns = set(data.column_names)
    if not ({"question", "answer"} <= columns or "text" in columns):
        raise ValueError(
            f"{name} needs 'question' and 'answer' columns (QA) or a 'text' column "
            f"(corpus); it has {sorted(columns)}"
        )
    return check_rows(data, name)


def check_rows(rows, name: str) -> list[str]:
    """The kind of each row of a forget or retain set: ``"qa"`` or ``"text"``.

    ``rows``: an iterable of dicts (a ``datasets.Dataset`` or parsed JSON rows). A row
    with a ``question`` or an ``answer`` (not None) is a QA row and needs both, else a
    row with a ``text`` is a text row; a set may mix the two (a table built from mixed
    rows holds None in the other kind's columns). A field in use must be a string with
    more than whitespace. Anything else raises ValueError naming the split, the row index
    and the field, because such a row would otherwise be trained on as ``"Question:
    None"`` with only EOS labelled, i.e. never unlearned.
    """
    kinds = []
    for i, row in enumerate(rows):
        where = f"{name}[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be an object with question/answer or text, got {type(row).__name__}")
        if row.get("question") is not None or row.get("answer") is not None:
            kinds.append("qa")
            fields = ("question", "answer")
        elif row.get("text") is not None:
            kinds.append("text")
            fields = ("text",)
        else:
            shown = {k: v for k, v in row.items() if v is not None} or "no non-null field"
            raise ValueError(f"{where}: needs 'question' and 'answer' (QA) or 'text' (corpus); it has {shown}")
        for field in fields:
            value = row.get(field)
            if value is None:
                raise ValueError(f"{where}: {field!r} is missing (a QA row needs a question and an answer)")
            if not isinstance(value, str):
                raise ValueError(f"{where}: {field!r} must be a string, got {type(value).__name__} {value!r}")
            if not value.strip():
                raise ValueError(f"{where}: {field!r} is empty")
    return kinds


def shared_rows(forget, retain) -> int:
    """How many forget rows are also a retain row (the same question and answer, or the
    same text): rows (checked by :func:`check_rows`) whose two losses pull against each other."""
    def key(row):
        if row.get("question") is not None or row.get("answer") is not None:
            return ("qa", row["question"], row["answer"])
        return ("text", row["text"])

    retained = {key(row) for row in retain}
    return sum(key(row) in retained for row in forget)


def model_context_length(model) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings``), if known."""
    return getattr(model.config, "max_position_embeddings", None)


def encode_dataset(tokenizer, data, name: str, max_length: int | None) -> list[dict]:
    """Tokenize a QA or text dataset into examples for :func:`alter.data.collate`.

    Each example holds ``input_ids``, ``attention_mask``, ``labels`` (int lists; QA rows
    are labelled on the answer only, text rows on every token). A row that is not a
    usable QA or text row (:func:`check_rows`) raises ``ValueError``, and so does an
    example longer than ``max_length``, naming the split and row, because truncating it
    would silently drop what should be forgotten or kept.
    """
    kinds = check_dataset(data, name)
    examples = []
    for i, (row, kind) in enumerate(zip(data, kinds)):
        try:
            if kind == "qa":
                example = encode_qa(tokenizer, row["question"], row["answer"], max_length)
            else:
                example = encode_text(tokenizer, row["text"], max_length)
        except ValueError as exc:
            raise ValueError(f"{name}[{i}]: {exc} (max_length defaults to the model's context)") from exc
        examples.append(example)
    return examples


def _batch(examples: list[dict], indices, pad_id: int, device) -> dict:
    """Collate ``examples[indices]`` (right padding) onto ``device``: one training step's
    batch. Per-token fields other than ids and labels (the cached ``entropy``) pad with 0."""
    return collate([examples[int(i)] for i in indices], pad_id, device=device)


def _model_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def eval_forwards(model, examples: list[dict], pad_id: int, batch_size: int, **forward_kwargs):
    """Yields ``(indices, batch, output)``: the model over ``examples`` in order,
    ``batch_size`` at a time on its device, in eval mode without gradients (its mode
    restored afterwards). A patched model reads each example's cached ``entropy`` when the
    examples carry it. The one no-grad forward loop of training-side scoring."""
    patched = is_patched(model)
    with evaluating(model):
        for indices, batch in collated_batches(examples, pad_id, batch_size, device=next(model.parameters()).device):
            cached = patched and "entropy" in batch
            with precomputed_entropy(model, batch["entropy"]) if cached else contextlib.nullcontext():
                output = model(**_model_inputs(batch), **forward_kwargs)
            yield indices, batch, output


# ------------------------------------------------------------------ base-model pass


def base_model_pass(model, examples: list[dict], pad_id: int, q: float,
                    batch_size: int) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Features and token entropy of ``examples`` under the model (run it on the base
    model, before patching).

    Returns float64 ``[n, hidden]``, the mean-pooled last hidden state of each example
    (the k-means features), and per example float32 ``[len]``, the Tsallis entropy of the
    model's next-token distribution at each position.
    """
    features, entropies = [], []
    forwards = eval_forwards(model, examples, pad_id, batch_size, output_hidden_states=True)
    # A bar on a terminal only (disable=None), as the evaluation passes have.
    for indices, batch, out in tqdm(forwards, total=math.ceil(len(examples) / batch_size), desc="base-model pass",
                                    leave=False, disable=None):
        entropy = tsallis_entropy(out.logits, q).float().cpu()
        entropies += [entropy[row, : len(examples[i]["input_ids"])].clone() for row, i in enumerate(indices)]
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float64)
        hidden = out.hidden_states[-1].to(torch.float64)
        features.append(((hidden * mask).sum(1) / mask.sum(1)).cpu().numpy())
    return np.concatenate(features), entropies


def split_subdomains(features: np.ndarray, num_domains: int, seed: int = 0) -> np.ndarray:
    """k-means split of ``features [n, D]`` into ``num_domains`` sub-domains.

    Returns int64 labels ``[n]`` in ``0..num_domains-1``, the same for the same seed
    (``scipy.cluster.vq.kmeans2`` with k-means++ initialization). With no more distinct
    samples than domains, each distinct sample is its own sub-domain.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [n, D] array, got shape {features.shape}")
    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    if num_domains == 1:
        return np.zeros(features.shape[0], dtype=np.int64)
    distinct, inverse = np.unique(features, axis=0, return_inverse=True)
    if len(distinct) <= num_domains:
        return inverse.reshape(-1).astype(np.int64)  # each distinct sample its own sub-domain
    _, labels = kmeans2(features, num_domains, minit="++", missing="warn", rng=np.random.default_rng(seed))
    return labels.astype(np.int64)


def _prefix_trie(examples: list[dict]) -> dict:
    """The token-prefix trie of ``examples``: ``{(node, token): child}``, root node 0."""
    trie: dict = {}
    for example in examples:
        node = 0
        for token in example["input_ids"]:
            node = trie.setdefault((node, token), len(trie) + 1)
    return trie


def routing_targets(forget_examples: list[dict], retain_examples: list[dict]) -> tuple[list, list]:
    """The positions that teach the router, per forget and per retained example (int
    lists ``[len]``, 1 = a target).

    A forget position teaches the router its forget expert iff its context (the tokens up
    to and including it) is the prefix of no retained example: before that point the
    context cannot tell the forget example from a retained one (a shared BOS, question
    template or sentence opening), and a per-token router would only learn the mix of the
    two. Every retained position teaches the retention expert.
    """
    trie = _prefix_trie(retain_examples)
    forget_masks = []
    for example in forget_examples:
        node, mask = 0, []
        for token in example["input_ids"]:
            node = trie.get((node, token), -1) if node >= 0 else -1
            mask.append(int(node < 0))
        forget_masks.append(mask)
    return forget_masks, [[1] * len(example["input_ids"]) for example in retain_examples]


def route_keys(forget_examples: list[dict], retain_examples: list[dict], experts: list[int],
               tokenizer=None) -> list[dict]:
    """The keys of ``routing="sequence"`` (``AlterConfig.route_keys``): per forget example,
    the token n-grams that hold its first routing target (:func:`routing_targets`: where
    its prefix leaves every retained example), occur nowhere in a retained example, and
    hold no shorter such n-gram, each with the example's forget expert (``experts[i]``).
    Holding the divergence keeps a key inside what tells the row apart (an entity's name,
    seldom the template), so the key also fires in the same facts' other phrasings; every
    minimal one is kept, because the other phrasings may share one and not another
    (``"Lumdri-VII"`` before or after the verb). The n-grams have up to
    ``SHORT_KEY_TOKENS`` tokens; an example that has no such key anywhere after its
    divergence gets one of up to ``MAX_KEY_TOKENS`` (a name of many sub-word pieces, each
    shared with retained names), since a short key is a piece of the name alone and a
    long one spans the words around it too. An example that never leaves the retained
    prefixes, or whose n-grams all occur in retained examples, gets no key. Keys are
    unique (the first example's expert wins).

    With ``tokenizer``, an n-gram that starts a word is also encoded with and without a
    leading space (a name opening a sentence is tokenized apart from one inside it:
    ``"Vatmer"`` and ``" Vatmer"``), and its encodings that fit a key are keys with it. An
    n-gram one of whose encodings occurs in a retained example is no key (``"Bitvex"``
    opens no retained row, but ``" Bitvex"`` names a retained designer, whose rows may open
    with it); the longer n-grams around it are tried (``" Bitvex-V"``). N-grams of special
    tokens only are no keys."""
    retained = {n: {tuple(e["input_ids"][i:i + n]) for e in retain_examples
                    for i in range(len(e["input_ids"]) - n + 1)} for n in range(1, MAX_KEY_TOKENS + 1)}
    keys: dict[tuple, int] = {}
    for example, mask, expert in zip(forget_examples, routing_targets(forget_examples, retain_examples)[0], experts):
        if 1 not in mask:
            continue
        for longest in (SHORT_KEY_TOKENS, MAX_KEY_TOKENS):
            found = _example_keys(example["input_ids"], mask.index(1), longest, retained, tokenizer)
            if found:
                break
        for form in found:
            keys.setdefault(form, int(expert))
    return [{"tokens": list(tokens), "expert": expert} for tokens, expert in keys.items()]


def _example_keys(ids: list[int], start: int, longest: int, retained: dict, tokenizer) -> list[tuple]:
    """The keys of one forget example of :func:`route_keys` (each in its spacings), of
    n-grams of up to ``longest`` tokens, at the first position from ``start`` (its
    divergence) that any n-gram holding it and occurring in no retained example
    (``retained[n]``: the retained n-grams) can key."""
    covered, forms_found = [], []  # [first, end) of the n-grams that became keys; their forms
    for target in range(start, len(ids)):
        if covered:
            break
        for n in range(1, longest + 1):
            for first in range(max(target - n + 1, 0), min(target, len(ids) - n) + 1):
                window = tuple(ids[first:first + n])
                if window in retained[n] or any(f >= first and e <= first + n for f, e in covered):
                    continue
                forms = [window]
                if tokenizer is not None:
                    variants = _spacing_variants(tokenizer, ids, first, n)
                    if variants is None:  # special tokens only: it would fire on every row
                        continue
                    forms += [v for v in variants if 1 <= len(v) <= longest]  # longer ones cannot be keys
                if any(form in retained[len(form)] for form in forms):
                    continue  # a retained row holds its text in another spacing: a longer n-gram may not
                forms_found += forms
                covered.append((first, first + n))
    return forms_found


def _spacing_variants(tokenizer, ids: list[int], first: int, n: int) -> list[tuple] | None:
    """The encodings of the text of ``ids[first:first + n]`` (special tokens left out)
    without and with one leading space, when it starts a word (after a space, a
    non-alphanumeric character or the row's start); none inside a word, whose piece with a
    space would be another word's start. None when the n-gram is special tokens or spaces
    only."""
    text = tokenizer.decode(ids[first:first + n], skip_special_tokens=True)
    if not text.strip():
        return None
    before = tokenizer.decode(ids[first - 1:first], skip_special_tokens=True) if first else ""
    if not text[0].isspace() and before[-1:].isalnum():
        return []
    text = text.strip()
    return [tuple(tokenizer(form, add_special_tokens=False)["input_ids"]) for form in (text, " " + text)]


def mark_routing_targets(forget_examples: list[dict], retain_examples: list[dict]) -> None:
    """Set ``example["route_mask"]`` to :func:`routing_targets` in each example."""
    for examples, masks in zip((forget_examples, retain_examples), routing_targets(forget_examples, retain_examples)):
        for example, mask in zip(examples, masks):
            example["route_mask"] = mask


def with_fields(examples: list[dict], **fields: list) -> list[dict]:
    """New examples: each of ``examples`` with its value of every per-example field added
    (the originals stay as they are)."""
    return [{**example, **{name: values[i] for name, values in fields.items()}} for i, example in enumerate(examples)]


def _examples_digest(*splits: list[dict]) -> str:
    """SHA-256 of the token ids and labels of encoded splits: what the run trains on."""
    digest = hashlib.sha256()
    for examples in splits:
        digest.update(json.dumps([[e["input_ids"], e["labels"]] for e in examples]).encode())
    return digest.hexdigest()


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def step_indices(step: int, n_forget: int, n_retain: int, batch_size: int, seed: int):
    """Forget and retain example indices of global ``step``: a pure function of its
    arguments, so that a resumed run sees the same batches without replaying RNG."""
    per_epoch = math.ceil(n_forget / batch_size)
    epoch, j = divmod(step, per_epoch)
    forget_order = _epoch_order(n_forget, seed, 2 * epoch)
    forget_ids = forget_order[j * batch_size : (j + 1) * batch_size]
    retain_order = _epoch_order(n_retain, seed, 2 * epoch + 1)
    retain_ids = retain_order[(torch.arange(batch_size) + j * batch_size) % n_retain] if n_retain else None
    return forget_ids, retain_ids


def reference_logprobs(model, examples: list[dict], pad_id: int, batch_size: int) -> list[float]:
    """Per example, the sequence log-probability of its labelled tokens under the model
    (NPO's reference, computed once from the frozen starting model)."""
    values = []
    for _, batch, out in eval_forwards(model, examples, pad_id, batch_size):
        values += sequence_logprob(out.logits, batch["labels"]).cpu().tolist()
    return values

