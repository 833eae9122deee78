"""alter.eval: metrics against float64 references on fake models whose log-probabilities
the test controls, hand-computed values, and a tiny Llama for the full TOFU evaluation."""
import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from alter import eval as E
from alter.evaluation.scoring import last_token_logprobs
from alter.data import format_mcq, format_qa, qa_texts, tofu_mini
from alter.tiny import build_tokenizer, tiny_llama

MCQ_ROWS = [
    {"question": "What is the capital of Peru?", "choices": ["Lima", "Oslo", "Rome", "Paris"], "answer": 0},
    {"question": "Who wrote Hamlet?", "choices": ["Homer", "William Shakespeare", "Mark Twain", "Jane Austen"],
     "answer": 1},
    {"question": "On which continent is Kenya?", "choices": ["Asia", "Europe", "Africa", "Oceania"], "answer": 2},
    {"question": "Who wrote Emma?", "choices": ["Homer", "Bram Stoker", "Mark Twain", "Jane Austen"], "answer": 3},
    {"question": "What is the capital of Japan?", "choices": ["Tokyo", "Lima", "Cairo", "Rome"], "answer": 0},
]


@pytest.fixture(scope="module")
def data():
    return tofu_mini(num_authors=3, facts_per_author=2, num_perturbed=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer(data):
    mcq = [format_mcq(r["question"], r["choices"]) for r in MCQ_ROWS]
    return build_tokenizer(qa_texts(data) + mcq)


class BigramLM(nn.Module):
    """Logits at position t are ``table[input_ids[t]]``: the test knows every probability.

    ``dtype`` is the dtype of the returned logits; ``strided`` returns them as a
    non-contiguous view."""

    def __init__(self, table: torch.Tensor, dtype=torch.float32, strided=False):
        super().__init__()
        self.table = nn.Parameter(table.to(dtype), requires_grad=False)
        self.strided = strided

    def forward(self, input_ids, attention_mask=None):
        if self.strided:
            return SimpleNamespace(logits=self.table.t()[:, input_ids].permute(1, 2, 0))
        return SimpleNamespace(logits=self.table[input_ids])


class BagOfWordsLM(nn.Module):
    """Logits at position t are the sum of ``table`` rows of tokens 0..t (causal, and pad
    rows are zero, so left padding changes nothing): the prediction depends on the whole prompt."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return (self.table[input_ids].cumsum(dim=1),)  # a tuple, as return_dict=False models give


class ScriptedGenerator(nn.Module):
    """``generate`` answers each prompt with a scripted reply; checks greedy decoding and
    left padding."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.tokenizer, self.replies = tokenizer, replies
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, num_beams, pad_token_id):
        assert not do_sample and num_beams == 1
        tok, rows = self.tokenizer, []
        for ids, mask in zip(input_ids, attention_mask):
            assert mask.tolist() == sorted(mask.tolist()), "prompts must be left-padded"
            prompt = tok.decode(ids[mask.bool()], skip_special_tokens=True)
            reply = tok(" " + self.replies[prompt], add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids.tolist() + reply + [tok.eos_token_id])
        longest = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (longest - len(r)) for r in rows])


def random_table(vocab_size: int, seed: int = 0) -> torch.Tensor:
    table = 3 * torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed))
    table[:, 0] = float("-inf")  # the pad token is masked out of the vocabulary
    return table


def reference_nll(tokenizer, table: torch.Tensor, question: str, answer: str) -> tuple[float, int]:
    """float64 summed NLL of the answer tokens (and EOS) under a bigram table, and their count."""
    prompt = tokenizer(format_qa(question))["input_ids"]
    ids = tokenizer(format_qa(question, answer))["input_ids"] + [tokenizer.eos_token_id]
    logp = torch.log_softmax(table.double(), dim=-1)
    return -sum(logp[ids[t - 1], ids[t]].item() for t in range(len(prompt), len(ids))), len(ids) - len(prompt)


def reference_probability(tokenizer, table, question, answer) -> float:
    nll, n = reference_nll(tokenizer, table, question, answer)
    return math.exp(-nll / n)


def rows_of(data, *splits):
    return [row for split in splits for row in data[split]]


# --------------------------------------------------------------------------------------
# Likelihood metrics
# --------------------------------------------------------------------------------------


# float32 log-softmax against float64 on the same (low-precision) logits: rtol 1e-5.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_answer_log_likelihood_matches_float64(data, tokenizer, dtype, strided):
    table = random_table(len(tokenizer))
    model = BigramLM(table, dtype, strided)
    rows = rows_of(data, "forget", "retain", "holdout")
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    nll, counts = E.answer_log_likelihood(model, tokenizer, questions, answers, batch_size=3)
    expected = [reference_nll(tokenizer, table.to(dtype), q, a) for q, a in zip(questions, answers)]
    assert nll.dtype == np.float64 and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [n for _, n in expected])
    np.testing.assert_allclose(nll, [s for s, _ in expected], rtol=1e-5)
    prob = E.answer_probability(model, tokenizer, questions, answers, batch_size=2)
    np.testing.assert_allclose(prob, [math.exp(-s / n) for s, n in expected], rtol=1e-5)


def test_uniform_model_hand_values(data, tokenizer):
    # Every token has probability 1/V, so every answer too (length-normalized), and
    # every truth ratio is exactly 1.
    model = BigramLM(torch.zeros(len(tokenizer), len(tokenizer)))
    rows = data["retain"]
    prob = E.answer_probability(model, tokenizer, rows["question"], rows["answer"])
    np.testing.assert_allclose(prob, 1 / len(tokenizer), rtol=1e-6)
    np.testing.assert_allclose(E.truth_ratio(model, tokenizer, rows), 1.0, rtol=1e-6)


@pytest.mark.parametrize("reference", ["paraphrased_answer", "answer"])
def test_truth_ratio_matches_float64(data, tokenizer, reference):
    table = random_table(len(tokenizer), seed=1)
    split = datasets.concatenate_datasets([data["retain"], data["real_authors"].select(range(3))])
    ratios = E.truth_ratio(BigramLM(table), tokenizer, split, reference=reference, batch_size=4)
    expected = []
    for row in split:
        p_ref = reference_probability(tokenizer, table, row["question"], row[reference])
        p_wrong = [reference_probability(tokenizer, table, row["question"], w) for w in row["perturbed_answer"]]
        expected.append(stats.gmean(p_wrong) / p_ref)
    np.testing.assert_allclose(ratios, expected, rtol=1e-5)


def test_truth_ratio_with_uneven_perturbations(tokenizer):
    table = random_table(len(tokenizer), seed=2)
    rows = datasets.Dataset.from_list([
        {"question": "Who wrote Emma?", "answer": "Emma was written by Jane Austen.",
         "perturbed_answer": ["Emma was written by Homer."]},
        {"question": "Who wrote Hamlet?", "answer": "Hamlet was written by William Shakespeare.",
         "perturbed_answer": ["Hamlet was written by Homer.", "Hamlet was written by Mark Twain.",
                              "Hamlet was written by Bram Stoker."]},
    ])
    ratios = E.truth_ratio(BigramLM(table), tokenizer, rows, reference="answer")
    for ratio, row in zip(ratios, rows):
        p = [reference_probability(tokenizer, table, row["question"], a) for a in row["perturbed_answer"]]
        assert ratio == pytest.approx(stats.gmean(p) / reference_probability(
            tokenizer, table, row["question"], row["answer"]), rel=1e-5)


def test_likelihood_rejects_bad_input(data, tokenizer):
    model = BigramLM(torch.zeros(len(tokenizer), len(tokenizer)))
    with pytest.raises(TypeError, match="questions must be a sequence of strings"):
        E.answer_log_likelihood(model, tokenizer, "Who wrote Emma?", ["Jane Austen."])
    with pytest.raises(ValueError, match="differ in length"):
        E.answer_log_likelihood(model, tokenizer, ["Who wrote Emma?"], [])
    with pytest.raises(ValueError, match="questions is empty"):
        E.answer_probability(model, tokenizer, [], [])
    with pytest.raises(ValueError, match="batch_size"):
        E.answer_probability(model, tokenizer, ["Who wrote Emma?"], ["Homer."], batch_size=0)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['paraphrased_answer'\]"):
        E.truth_ratio(model, tokenizer, data["retain"].remove_columns("paraphrased_answer"))
    # A local file with one wrong answer as a bare string instead of a list of strings.
    one_string = datasets.Dataset.from_list([{"question": "Who wrote Emma?", "answer": "Emma was written by Homer.",
                                              "perturbed_answer": "Emma was written by Homer."}])
    with pytest.raises(TypeError, match="row 0: perturbed_answer must be a list of strings"):
        E.truth_ratio(model, tokenizer, one_string, reference="answer")
    no_wrong = datasets.Dataset.from_list([{"question": "Who wrote Emma?", "answer": "Emma was written by Homer.",
                                            "perturbed_answer": w} for w in (["Homer."], [])])
    with pytest.raises(ValueError, match="row 1: perturbed_answer is empty"):
        E.truth_ratio(model, tokenizer, no_wrong, reference="answer")
    short = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=8)
    with pytest.raises(ValueError, match=r"Who wrote Emma\?.*max_length=8"):
        E.answer_probability(short, tokenizer, ["Who wrote Emma?"], ["Emma was written by Homer."])


def test_batching_and_padding_do_not_change_a_real_model(data, tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2)
    model.train()
    rows = rows_of(data, "forget", "retain")
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    one = E.answer_log_likelihood(model, tokenizer, questions, answers, batch_size=1)
    padded = E.answer_log_likelihood(model, tokenizer, questions, answers, batch_size=4)
    np.testing.assert_allclose(one[0], padded[0], rtol=1e-5)  # float32 sums over ~10 tokens
    np.testing.assert_array_equal(one[1], padded[1])
    assert model.training  # the model's mode is restored


# --------------------------------------------------------------------------------------
# Generation metrics (ROUGE on known strings)
# --------------------------------------------------------------------------------------

# rouge_score lowercases, keeps alphanumeric words, stems; reference
# "the capital of france is paris" has 6 words.
ROUGE_CASES = [
    # (generated answer, max_new_tokens, LCS with the reference)
    ("The capital of France is Paris.", 32, 6),
    ("Paris is the capital of France.", 32, 4),  # LCS "the capital of france"
    ("The capital of France is Rome.", 32, 5),
    ("Tokyo", 32, 0),
    ("Paris is the capital of France.", 2, 1),  # cut to " Paris is"
]


@pytest.mark.parametrize("generated,max_new_tokens,lcs", ROUGE_CASES)
def test_rouge_l_recall_known_strings(tokenizer, generated, max_new_tokens, lcs):
    question, answer = "What is the capital of France?", "The capital of France is Paris."
    other_q, other_a = "Who wrote Emma?", "Emma was written by Jane Austen."
    model = ScriptedGenerator(tokenizer, {format_qa(question): generated, format_qa(other_q): other_a})
    # Two prompts of different lengths in one batch: left padding is exercised.
    recall = E.rouge_l_recall(model, tokenizer, [question, other_q], [answer, other_a],
                              max_new_tokens=max_new_tokens, batch_size=2)
    assert recall[0] == pytest.approx(lcs / 6)
    assert recall[1] == pytest.approx(1.0 if max_new_tokens > 2 else 2 / 6)  # "Emma was" of 6 words


def test_muse_rouge_f1_known_strings(tokenizer):
    # verbmem: reference "emma was written by jane austen" (6), continuation
    # "emma was written" (3): precision 1, recall 1/2, F1 2/3. Second prompt exact: F1 1.
    verbmem = datasets.Dataset.from_list([
        {"prompt": "Who wrote Emma?", "gt": "Emma was written by Jane Austen."},
        {"prompt": "Who wrote Hamlet?", "gt": "Hamlet was written by William Shakespeare."},
    ])
    model = ScriptedGenerator(tokenizer, {"Who wrote Emma?": "Emma was written",
                                          "Who wrote Hamlet?": "Hamlet was written by William Shakespeare."})
    assert E.verbmem_rouge(model, tokenizer, verbmem) == pytest.approx((2 / 3 + 1) / 2)
    # knowmem: answer "paris" (1 word), generated "the capital of france is paris" (6): P 1/6, R 1, F1 2/7.
    question = "What is the capital of France?"
    knowmem = datasets.Dataset.from_list([{"question": question, "answer": "Paris"}])
    model = ScriptedGenerator(tokenizer, {E.knowmem_prompt(question): "The capital of France is Paris."})
    assert E.knowmem_rouge(model, tokenizer, knowmem) == pytest.approx(2 / 7)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['gt'\]"):
        E.verbmem_rouge(model, tokenizer, verbmem.remove_columns("gt"))


def test_generate_rejects_prompts_beyond_the_context(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    prompt = format_qa("What is the capital of France?")
    assert len(E.generate(model, tokenizer, [prompt], max_new_tokens=2)) == 1
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        E.generate(model, tokenizer, [prompt], max_new_tokens=16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        E.generate(model, tokenizer, [prompt], max_new_tokens=0)


# --------------------------------------------------------------------------------------
# Summary statistics
# --------------------------------------------------------------------------------------


def test_forget_quality_is_the_ks_test_p_value():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=37), rng.lognormal(0.3, size=23)
    assert E.forget_quality(a, b) == stats.ks_2samp(a, b).pvalue
    assert E.forget_quality(a, a) == pytest.approx(1.0)  # identical samples
    # Fully separated samples of 10 and 10: the exact p-value is 2 / C(20, 10).
    assert E.forget_quality(np.arange(10) + 0.5, np.arange(10) + 100.0) == pytest.approx(2 / math.comb(20, 10))


def test_forget_quality_accepts_overflowed_ratios():
    # R = exp(loss gap) is inf past a 709-nat gap (aggressive gradient ascent); KS uses ranks only.
    unlearned, retain = [0.2, float("inf"), 3.0, float("inf")], [0.5, 0.7, 1.1]
    expected = stats.ks_2samp([0.2, 1e300, 3.0, 1e300], retain).pvalue
    assert E.forget_quality(unlearned, retain) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad,match", [([], "non-empty"), ([[1.0, 2.0]], "1-D"), ([1.0, float("nan")], "NaN"),
                                       ([1.0, -0.5], ">= 0")])
def test_forget_quality_rejects_bad_samples(bad, match):
    with pytest.raises(ValueError, match=match):
        E.forget_quality(bad, [0.5, 0.7])
    with pytest.raises(ValueError, match=match):
        E.forget_quality([0.5, 0.7], bad)


def test_model_utility_is_the_harmonic_mean():
    values = np.random.default_rng(1).uniform(0.05, 1.0, size=9)
    components = dict(zip(E.UTILITY_KEYS, values))
    assert E.model_utility(components) == pytest.approx(9 / np.sum(1 / values), rel=1e-12)
    assert E.model_utility(dict(components, world_facts_rouge=0.0)) == 0.0
    with pytest.raises(ValueError, match=r"lacks \['retain_prob'\]"):
        E.model_utility({k: v for k, v in components.items() if k != "retain_prob"})
    with pytest.raises(ValueError, match=">= 0"):
        E.model_utility(dict(components, retain_prob=-0.1))
    with pytest.raises(TypeError, match="mapping"):
        E.model_utility(list(values))


def test_evaluate_tofu_combines_the_metrics(data, tokenizer):
    small = datasets.DatasetDict({
        "forget": data["forget"], "retain": data["retain"],
        "real_authors": data["real_authors"].select(range(3)), "world_facts": data["world_facts"].select(range(3)),
    })
    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    kw = dict(batch_size=4)
    result = E.evaluate_tofu(model, tokenizer, small, max_new_tokens=4, **kw)
    assert result["forget_quality"] is None
    forget_ratios = E.truth_ratio(model, tokenizer, small["forget"], **kw)
    np.testing.assert_allclose(result["forget_truth_ratios"], forget_ratios, rtol=1e-12)
    assert result["forget_truth_ratio"] == pytest.approx(np.minimum(forget_ratios, 1 / forget_ratios).mean())
    for split in ("forget", "retain"):
        ds = small[split]
        assert result[f"{split}_prob"] == pytest.approx(
            E.answer_probability(model, tokenizer, ds["question"], ds["answer"], **kw).mean())
        assert result[f"{split}_rouge"] == pytest.approx(
            E.rouge_l_recall(model, tokenizer, ds["question"], ds["answer"], max_new_tokens=4, **kw).mean())

    components = result["utility_components"]
    assert set(components) == set(E.UTILITY_KEYS)
    retain_r = E.truth_ratio(model, tokenizer, small["retain"], **kw)
    assert components["retain_truth_ratio"] == pytest.approx(np.maximum(0, 1 - retain_r).mean())
    for split in ("real_authors", "world_facts"):
        ds = small[split]
        p = E.answer_probability(model, tokenizer, ds["question"], ds["answer"], **kw)
        p_wrong = [E.answer_probability(model, tokenizer, [q] * len(w), w, **kw).sum()
                   for q, w in zip(ds["question"], ds["perturbed_answer"])]
        assert components[f"{split}_prob"] == pytest.approx(np.mean(p / (p + np.array(p_wrong))))
        r = E.truth_ratio(model, tokenizer, ds, reference="answer", **kw)
        assert components[f"{split}_truth_ratio"] == pytest.approx(np.maximum(0, 1 - r).mean())
    assert result["model_utility"] == pytest.approx(E.model_utility(components))

    retain_model_ratios = [0.3, 0.5, 0.9, 1.1]
    with_fq = E.evaluate_tofu(model, tokenizer, small, retain_model_truth_ratios=retain_model_ratios,
                              max_new_tokens=4, **kw)
    assert with_fq["forget_quality"] == stats.ks_2samp(forget_ratios, retain_model_ratios).pvalue

    with pytest.raises(ValueError, match="lacks the split 'real_authors'"):
        E.evaluate_tofu(model, tokenizer, datasets.DatasetDict({k: small[k] for k in ("forget", "retain")}))
    with pytest.raises(ValueError, match=r"split 'world_facts' lacks column\(s\) \['perturbed_answer'\]"):
        E.evaluate_tofu(model, tokenizer, datasets.DatasetDict(
            dict(small, world_facts=small["world_facts"].remove_columns("perturbed_answer"))))


def test_memorized_facts_score_high(data, tokenizer):
    """End to end on a real model: a tiny Llama that memorized a few facts answers them
    verbatim under greedy, batched (left-padded) generation."""
    from alter.data import collate, encode_qa

    rows = rows_of(data, "forget", "retain")
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2, seed=0)
    batch = collate([encode_qa(tokenizer, q, a, 64) for q, a in zip(questions, answers)], tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, "the tiny model did not memorize six facts"
    assert (E.answer_probability(model, tokenizer, questions, answers) > 0.9).all()
    np.testing.assert_array_equal(E.rouge_l_recall(model, tokenizer, questions, answers, batch_size=4), 1.0)
    holdout = data["holdout"]
    assert E.answer_probability(model, tokenizer, holdout["question"], holdout["answer"]).max() < 0.9


# --------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------


def mcq_dataset(rows=MCQ_ROWS):
    return datasets.Dataset.from_list(rows)


def test_mcq_accuracy_hand_example(tokenizer):
    # Only "Answer:" ends in ":"; after it the model puts all mass on " B": it always
    # answers B, right on 1 of the 5 questions.
    table = torch.zeros(len(tokenizer), len(tokenizer))
    table[tokenizer.convert_tokens_to_ids(":"), tokenizer.convert_tokens_to_ids(" B")] = 20.0
    assert E.mcq_accuracy(BigramLM(table), tokenizer, mcq_dataset()) == pytest.approx(1 / 5)
    table[tokenizer.convert_tokens_to_ids(":"), tokenizer.convert_tokens_to_ids(" A")] = 30.0
    assert E.mcq_accuracy(BigramLM(table), tokenizer, mcq_dataset()) == pytest.approx(2 / 5)


def reference_mcq_predictions(tokenizer, table: torch.Tensor, rows, with_eos: bool) -> list[int]:
    """float64 argmax over letters of the log-likelihood of " A".." D" (and a trailing
    EOS when the tokenizer appends one) under BagOfWordsLM."""
    predictions = []
    for row in rows:
        prompt = format_mcq(row["question"], row["choices"])
        n = len(tokenizer(prompt)["input_ids"])
        scores = []
        for letter in "ABCD":
            ids = tokenizer(prompt + " " + letter)["input_ids"]
            logits = table.double()[ids].cumsum(0)
            logp = torch.log_softmax(logits, -1)
            scores.append(sum(logp[t - 1, ids[t]].item() for t in range(n - (1 if with_eos else 0), len(ids))))
        predictions.append(int(np.argmax(scores)))
    return predictions


def eos_appending(tokenizer):
    """A copy of the tokenizer whose encodings end in EOS: the letters are no longer one
    token after the prompt, so mcq_accuracy scores whole continuations."""
    from tokenizers import processors

    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
                                   pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    copy.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)])
    return copy


@pytest.mark.parametrize("with_eos", [False, True])
def test_mcq_accuracy_matches_float64(tokenizer, with_eos):
    tok = eos_appending(tokenizer) if with_eos else tokenizer
    assert (tok("x")["input_ids"][-1] == tok.eos_token_id) == with_eos
    for seed in range(3):
        table = torch.randn(len(tok), len(tok), generator=torch.Generator().manual_seed(seed))
        table[tok.pad_token_id] = 0.0
        expected = reference_mcq_predictions(tok, table, MCQ_ROWS, with_eos)
        accuracy = np.mean([p == r["answer"] for p, r in zip(expected, MCQ_ROWS)])
        assert E.mcq_accuracy(BagOfWordsLM(table), tok, mcq_dataset(), batch_size=2) == pytest.approx(accuracy)


def test_mcq_scores_of_left_padded_prompts_match_single_prompts(tokenizer):
    # GPT-2 has absolute position embeddings: a left-padded prompt is scored like the same
    # prompt alone only when the position ids skip the padding.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128))
    prompts = [tokenizer(format_mcq(r["question"], r["choices"]))["input_ids"] for r in MCQ_ROWS]
    assert len({len(p) for p in prompts}) > 1  # the batch is padded
    letters = np.array([tokenizer.convert_tokens_to_ids([" A", " B", " C", " D"])] * len(prompts))
    alone = last_token_logprobs(model, tokenizer, prompts, letters, batch_size=1)
    batched = last_token_logprobs(model, tokenizer, prompts, letters, batch_size=len(prompts))
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)  # float32 logits, same positions


def test_mcq_accuracy_rejects_bad_input(tokenizer):
    model = BigramLM(torch.zeros(len(tokenizer), len(tokenizer)))
    with pytest.raises(ValueError, match=r"row 0 has answer 4"):
        E.mcq_accuracy(model, tokenizer, mcq_dataset([dict(MCQ_ROWS[0], answer=4)]))
    with pytest.raises(ValueError, match=r"row 0 has 1 choices"):
        E.mcq_accuracy(model, tokenizer, mcq_dataset([dict(MCQ_ROWS[0], choices=["Lima"], answer=0)]))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['choices'\]"):
        E.mcq_accuracy(model, tokenizer, mcq_dataset().remove_columns("choices"))
    # A tokenizer that knows no letters maps " A".." D" all to <unk>.
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "Answer": 2, ":": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    blind = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(ValueError, match="cannot tell the answer letters apart"):
        E.mcq_accuracy(BigramLM(torch.zeros(4, 4)), blind, mcq_dataset())
