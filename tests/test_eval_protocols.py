"""Evaluation settings of TOFU, open-unlearning, MUSE and lm-evaluation-harness: prompt
formats, generation length, MUSE's knowmem / verbmem protocol, the lm-eval multiple-choice
prompt, and the ``alter eval`` flags that pass them through."""
import json

import datasets
import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from torch import nn

import alter.evaluation
from alter import eval as E
from alter.cli import main
from alter.data import PromptFormat, encode_qa, format_mcq, format_qa, qa_texts, tofu_mini
from alter.tiny import build_tokenizer, tiny_llama
from test_eval import MCQ_ROWS, BagOfWordsLM, BigramLM, ScriptedGenerator, random_table

# A toy chat template in the usual shape: the rendered text holds the BOS itself.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MUSE_QA = [("Who wrote Emma?", "Jane Austen"), ("What is the capital of Peru?", "Lima"),
           ("Which city did the author move to?", "Paris")]
WRITING = ("The author writes novels about writing.", "writing novel")
MCQ = [dict(row, question=f" {row['question']} ", subject=("high_school_geography", "world_literature")[i % 2])
       for i, row in enumerate(MCQ_ROWS)]


@pytest.fixture(scope="module")
def data():
    return tofu_mini(num_authors=3, facts_per_author=2, num_perturbed=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer(data):
    texts = qa_texts(data) + [E.knowmem_prompt(q, MUSE_QA) + a + "\n\nQuestion: Who?" for q, a in MUSE_QA]
    texts += list(WRITING) + ["[INST] [/INST] <|user|> <|assistant|> <|system|> Be brief."]
    texts += [format_mcq(r["question"], r["choices"], r["subject"]) for r in MCQ]
    texts += [format_mcq(r["question"], r["choices"], "geography") for r in MCQ]
    tok = build_tokenizer(texts)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def qa(pairs):
    return datasets.Dataset.from_list([{"question": q, "answer": a} for q, a in pairs])



# ------------------------------------------------------------------ prompt formats


def test_prompt_formats_render_tofus_and_chat_prompts(tokenizer):
    q, a = "Who wrote Emma?", "Jane Austen"
    plain = PromptFormat()
    assert plain.prompt(tokenizer, q) + plain.completion(tokenizer, q, a) == format_qa(q, a)
    inst = PromptFormat("llama2-inst")
    assert inst.prompt(tokenizer, q) == "[INST] Who wrote Emma? [/INST]"
    assert inst.completion(tokenizer, q, a) == "Jane Austen"  # TOFU's answer_tag is ""
    chat = PromptFormat("chat", system_prompt="Be brief.")
    assert chat.prompt(tokenizer, q) == "<s><|system|> Be brief.<|user|> Who wrote Emma?<|assistant|>"
    assert chat.completion(tokenizer, q, a) == " Jane Austen</s>"
    assert not chat.add_special_tokens and plain.add_special_tokens


@pytest.mark.parametrize("style", ["plain", "llama2-inst", "chat"])
def test_encode_qa_labels_only_the_answer_in_every_format(tokenizer, style):
    fmt = PromptFormat(style)
    enc = encode_qa(tokenizer, "Who wrote Emma?", "Jane Austen", None, fmt)
    labelled = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != -100]
    assert tokenizer.decode(labelled, skip_special_tokens=True).strip() == "Jane Austen"
    assert enc["input_ids"].count(tokenizer.bos_token_id) == 1  # the chat text's own BOS, not a second
    assert enc["input_ids"][-1] == tokenizer.eos_token_id


def test_prompt_format_bad_input(tokenizer):
    with pytest.raises(ValueError, match="style must be one of"):
        PromptFormat("alpaca")
    with pytest.raises(ValueError, match="apply to the 'chat' style"):
        PromptFormat("plain", system_prompt="Be brief.")
    bare = build_tokenizer(["Who wrote Emma?"])
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat("chat").prompt(bare, "Who wrote Emma?")


@pytest.mark.parametrize("style", ["llama2-inst", "chat"])
def test_answer_likelihood_in_a_prompt_format_matches_float64(data, tokenizer, style):
    fmt = PromptFormat(style)
    table = random_table(len(tokenizer), seed=4)
    rows = list(data["forget"]) + list(data["retain"])
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    nll, counts = E.answer_log_likelihood(BigramLM(table), tokenizer, questions, answers, batch_size=3,
                                          prompt_format=fmt)
    logp = torch.log_softmax(table.double(), dim=-1)
    for q, a, got, n in zip(questions, answers, nll, counts):
        prompt = tokenizer(fmt.prompt(tokenizer, q), add_special_tokens=fmt.add_special_tokens)["input_ids"]
        full = tokenizer(fmt.prompt(tokenizer, q) + fmt.completion(tokenizer, q, a),
                         add_special_tokens=fmt.add_special_tokens)["input_ids"]
        full = full + [tokenizer.eos_token_id] * (full[-1] != tokenizer.eos_token_id)
        assert n == len(full) - len(prompt)
        assert got == pytest.approx(-sum(logp[full[t - 1], full[t]].item() for t in range(len(prompt), len(full))),
                                    rel=1e-5)


def test_evaluate_tofu_first_questions_and_prompt_format(data, tokenizer):
    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=5)
    kw = dict(batch_size=4, max_new_tokens=3, prompt_format="llama2-inst")
    first = E.evaluate_tofu(model, tokenizer, data, num_questions=2, **kw)
    cut = datasets.DatasetDict({name: split.select(range(2)) for name, split in data.items()})
    assert first == E.evaluate_tofu(model, tokenizer, cut, **kw)
    assert first != E.evaluate_tofu(model, tokenizer, cut, batch_size=4, max_new_tokens=3)  # plain prompts
    with pytest.raises(ValueError, match="num_questions must be a positive int"):
        E.evaluate_tofu(model, tokenizer, data, num_questions=0)


# ------------------------------------------------------------------ generation length


class GenerationRecorder(nn.Module):
    """A real model whose ``generate`` outputs are kept for the test to count."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.outputs = model, model.config, []

    def generate(self, input_ids, **kwargs):
        output = self.model.generate(input_ids=input_ids, **kwargs)
        self.outputs.append((input_ids.shape[1], output))
        return output


class RecordingGenerator(ScriptedGenerator):
    """A ScriptedGenerator that records the max_new_tokens it is asked for."""

    def __init__(self, tokenizer, replies):
        super().__init__(tokenizer, replies)
        self.asked = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.asked.append(max_new_tokens)
        return super().generate(input_ids, attention_mask, max_new_tokens, **kwargs)


@pytest.mark.parametrize("max_new_tokens", [1, 7, 200])
def test_generation_length_is_honoured_by_a_real_model(tokenizer, max_new_tokens):
    # No special token can be generated, so the model never stops early: exactly
    # max_new_tokens tokens are generated, and they are what comes back.
    llama = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=6)
    llama.generation_config.suppress_tokens = tokenizer.all_special_ids
    model = GenerationRecorder(llama)
    prompts = [format_qa("Who wrote Emma?"), format_qa("What is the capital of Peru?")]
    for prompt in prompts:
        [text] = E.generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)
        prompt_length, output = model.outputs[-1]
        new = output[0, prompt_length:].tolist()
        assert len(new) == max_new_tokens and not set(new) & set(tokenizer.all_special_ids)
        assert text == tokenizer.decode(new).strip()


def test_rouge_generation_length_is_passed_through(data, tokenizer):
    rows = data["forget"]
    model = RecordingGenerator(tokenizer, {format_qa(q): a for q, a in zip(rows["question"], rows["answer"])})
    E.rouge_l_recall(model, tokenizer, rows["question"], rows["answer"], max_new_tokens=123)
    assert model.asked and set(model.asked) == {123}


# -------------------------------------------------------------------------- MUSE


def test_knowmem_prompt_is_muses():
    shots = MUSE_QA[:2]
    assert E.knowmem_prompt("Q?", shots) == ("Question: Who wrote Emma?\nAnswer: Jane Austen\n\n"
                                             "Question: What is the capital of Peru?\nAnswer: Lima\n\n"
                                             "Question: Q?\nAnswer: ")


@pytest.mark.parametrize("reply, expected", [
    ("Paris\n\nQuestion: Who wrote Emma?", 1.0),  # a right answer, then a new question
    ("Paris\nQuestion: Who?", 1.0),
    ("Paris Question: Who?", 1.0),
    ("Paris", 1.0),
    ("Lima\n\nParis", 0.0),  # cut at the blank line: only "Lima" is scored
])
def test_knowmem_cuts_at_muses_stop_strings(tokenizer, reply, expected):
    question, answer = MUSE_QA[2]
    few_shot = qa(MUSE_QA[:2])
    prompt = E.knowmem_prompt(question, MUSE_QA[:2])
    model = ScriptedGenerator(tokenizer, {prompt: reply})
    knowmem = qa([(question, answer)])
    assert E.knowmem_rouge(model, tokenizer, knowmem, few_shot=few_shot) == pytest.approx(expected)
    assert E.knowmem_rouge(model, tokenizer, knowmem, few_shot=MUSE_QA[:2]) == pytest.approx(expected)


def test_generate_cuts_before_stripping(tokenizer):
    # MUSE cuts the raw decoded text: a reply that opens with a blank line is empty.
    model = ScriptedGenerator(tokenizer, {"Who wrote Emma?": "\n\nJane Austen"})
    assert E.generate(model, tokenizer, ["Who wrote Emma?"], stop=E.KNOWMEM_STOP) == [""]
    assert E.generate(model, tokenizer, ["Who wrote Emma?"]) == ["Jane Austen"]
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        E.generate(model, tokenizer, ["Who wrote Emma?"], stop=[""])


def test_muse_rouge_does_not_stem(tokenizer):
    reference, generated = WRITING
    question = "What does the author write?"
    model = ScriptedGenerator(tokenizer, {E.knowmem_prompt(question): generated})
    knowmem = qa([(question, reference)])
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, generated)["rougeL"]
    stemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, generated)["rougeL"]
    assert unstemmed.fmeasure < stemmed.fmeasure  # "writing novel" matches "writes novels" only when stemmed
    assert E.knowmem_rouge(model, tokenizer, knowmem) == pytest.approx(unstemmed.fmeasure)


def test_verbmem_scores_the_first_tokens_of_the_reference(tokenizer):
    gt = "Emma was written by Jane Austen."
    model = ScriptedGenerator(tokenizer, {"Who wrote Emma?": "Emma was written"})
    verbmem = datasets.Dataset.from_list([{"prompt": "Who wrote Emma?", "gt": gt}])
    # 4 tokens of tokenizer(gt): BOS, "Emma", " was", " written" (MUSE counts the BOS).
    assert E.verbmem_rouge(model, tokenizer, verbmem, max_new_tokens=4) == pytest.approx(1.0)
    # 128 tokens hold the whole reference: F1 of 3 of 6 words.
    assert E.verbmem_rouge(model, tokenizer, verbmem) == pytest.approx(2 / 3)


# -------------------------------------------------------------- lm-eval multiple choice


def test_lm_eval_mcq_prompt():
    assert format_mcq(" What? ", ["x", "y"], "high_school_biology") == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What?\nA. x\nB. y\nAnswer:")
    assert format_mcq(" What? ", ["x", "y"]) == " What? \nA. x\nB. y\nAnswer:"


def reference_mcq_accuracy(tokenizer, table, rows, subjects) -> float:
    """float64: argmax over letters of log p(letter | prompt) under BagOfWordsLM."""
    right = []
    for row, subject in zip(rows, subjects):
        ids = tokenizer(format_mcq(row["question"], row["choices"], subject))["input_ids"]
        logp = torch.log_softmax(table.double()[ids].sum(0), -1)
        letters = tokenizer.convert_tokens_to_ids([" A", " B", " C", " D"])
        right.append(int(np.argmax([logp[i].item() for i in letters])) == row["answer"])
    return float(np.mean(right))


def test_mcq_accuracy_with_the_lm_eval_header_matches_float64(tokenizer):
    rows = MCQ
    dataset = datasets.Dataset.from_list(rows)
    accuracies = set()
    for seed in range(6):
        table = torch.randn(len(tokenizer), len(tokenizer), generator=torch.Generator().manual_seed(seed))
        table[tokenizer.pad_token_id] = 0.0
        model = BagOfWordsLM(table)
        by_column = E.mcq_accuracy(model, tokenizer, dataset, batch_size=4, lm_eval=True)
        assert by_column == pytest.approx(reference_mcq_accuracy(tokenizer, table, rows, [r["subject"] for r in rows]))
        fixed = E.mcq_accuracy(model, tokenizer, dataset, lm_eval=True, subject="geography")
        assert fixed == pytest.approx(reference_mcq_accuracy(tokenizer, table, rows, ["geography"] * len(rows)))
        accuracies.add((by_column, fixed, E.mcq_accuracy(model, tokenizer, dataset)))
    assert any(len(set(a)) > 1 for a in accuracies)  # the header changes some predictions
    with pytest.raises(ValueError, match="pass lm_eval=True"):
        E.mcq_accuracy(model, tokenizer, dataset, subject="geography")
    with pytest.raises(ValueError, match="needs a subject"):
        E.mcq_accuracy(model, tokenizer, dataset.remove_columns("subject"), lm_eval=True)


# ------------------------------------------------------------------ alter eval flags


@pytest.fixture
def recorded_eval(monkeypatch, tmp_path, tokenizer):
    """``alter eval`` on a saved tiny model with evaluate_tofu replaced by a recorder."""
    model_dir = tmp_path / "model"
    tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calls = []

    def fake_evaluate_tofu(model, tok, data, **kwargs):
        calls.append(kwargs)
        return {"forget_quality": None, "model_utility": 0.5, "forget_rouge": 0.25, "retain_rouge": 0.75,
                "forget_prob": 0.1, "utility_components": {"retain_prob": 0.2}, "mia_min_k": 0.6,
                "privleak": None}

    monkeypatch.setattr(alter.evaluation, "evaluate_tofu", fake_evaluate_tofu)

    def run(*flags):
        # tofu_mini by name: alter eval scores the user's own data unless TOFU data is asked for.
        return main(["eval", "--model", str(model_dir), "--data", "tofu_mini", "--out", str(tmp_path / "out" / "m.json"),
                     *flags])
    return run, calls, tmp_path


def test_eval_flags_are_passed_through(recorded_eval):
    run, calls, tmp_path = recorded_eval
    assert run() == 0
    assert calls[-1]["max_new_tokens"] == 200 and calls[-1]["batch_size"] == 16
    assert calls[-1]["num_questions"] is None and calls[-1]["prompt_format"] == PromptFormat("plain")
    summary = json.loads((tmp_path / "out" / "TOFU_SUMMARY.json").read_text())
    assert summary == {"forget_Q_A_Prob": 0.1, "forget_Q_A_ROUGE": 0.25, "mia_min_k": 0.6, "model_utility": 0.5,
                       "retain_Q_A_Prob": 0.2}

    assert run("--max-new-tokens", "7", "--prompt-format", "llama2-inst", "--num-questions", "300",
               "--batch-size", "5", "--summary", str(tmp_path / "s.json")) == 0
    assert calls[-1]["max_new_tokens"] == 7 and calls[-1]["batch_size"] == 5 and calls[-1]["num_questions"] == 300
    assert calls[-1]["prompt_format"] == PromptFormat("llama2-inst")
    assert (tmp_path / "s.json").exists()

    assert run("--chat-template", "--system-prompt", "Be brief.") == 0
    assert calls[-1]["prompt_format"] == PromptFormat("chat", "Be brief.")

    retain = tmp_path / "retain.json"
    retain.write_text(json.dumps({"forget_truth_ratios": [0.5, 1.0], "mia_min_k": 0.7}))
    assert run("--retain-metrics", str(retain)) == 0
    assert calls[-1]["retain_model_truth_ratios"] == [0.5, 1.0] and calls[-1]["retain_model_auc"] == 0.7


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "must be a positive integer"),
    (["--num-questions", "x"], "must be a positive integer"),
    (["--prompt-format", "alpaca"], "invalid choice"),
    (["--chat-template", "--prompt-format", "plain"], "contradicts"),
    (["--system-prompt", "Be brief."], "apply to the 'chat' style"),
])
def test_eval_flags_reject_bad_values(recorded_eval, capsys, flags, message):
    run, _, _ = recorded_eval
    with pytest.raises(SystemExit) as exit_info:
        run(*flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_eval_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--max-new-tokens", "default: 200", "--prompt-format", "--chat-template", "--num-questions",
                 "--batch-size", "--summary"):
        assert text in out


def test_load_muse_reads_the_privleak_texts(tmp_path):
    from alter.data import load_muse

    (tmp_path / "privleak").mkdir()
    (tmp_path / "privleak" / "holdout.jsonl").write_text('{"text": "t1"}\n{"text": "t2"}\n')
    assert load_muse("News", "privleak", "holdout", path=tmp_path)["text"] == ["t1", "t2"]


def test_evaluate_muse_combines_the_muse_metrics(data, tokenizer):
    muse = {
        "verbmem": datasets.Dataset.from_list([{"prompt": "Who wrote Emma?",
                                                "gt": "Emma was written by Jane Austen."}]),
        "knowmem_forget": qa(MUSE_QA[2:]), "knowmem_forget_icl": qa(MUSE_QA[:2]),
        "knowmem_retain": qa(MUSE_QA[:1]),
        "forget": datasets.Dataset.from_list([{"text": t} for t in data["forget"]["answer"]]),
        "holdout": datasets.Dataset.from_list([{"text": t} for t in data["holdout"]["answer"]]),
    }
    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=8)
    results = E.evaluate_muse(model, tokenizer, muse, retain_model_auc=0.45, max_length=None)
    assert list(results) == sorted(results)
    assert results["forget_verbmem_ROUGE"] == E.verbmem_rouge(model, tokenizer, muse["verbmem"])
    assert results["forget_knowmem_ROUGE"] == E.knowmem_rouge(model, tokenizer, muse["knowmem_forget"],
                                                               muse["knowmem_forget_icl"])
    assert results["retain_knowmem_ROUGE"] == E.knowmem_rouge(model, tokenizer, muse["knowmem_retain"])
    forget, holdout = muse["forget"]["text"], muse["holdout"]["text"]
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        expected = E.mia_auc(E.mia_scores(model, tokenizer, forget, attack),
                             E.mia_scores(model, tokenizer, holdout, attack))
        assert results[f"mia_{attack}"] == pytest.approx(expected, abs=1e-12)
    assert results["privleak"] == pytest.approx(E.privleak(results["mia_min_k"], 0.45))
    assert "privleak" not in E.evaluate_muse(model, tokenizer, {k: muse[k] for k in ("forget", "holdout")})
    with pytest.raises(ValueError, match="needs a 'holdout' split"):
        E.evaluate_muse(model, tokenizer, {"forget": muse["forget"]})
