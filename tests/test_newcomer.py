"""A newcomer's first hour, replayed (issue 21): their own ``save_pretrained`` model and QA /
text JSONL files through ``alter unlearn``, ``alter eval``, ``load_adapter`` and
``generate``, and the bad inputs a newcomer gives; exit codes, messages and files."""
import argparse
import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alter import UnlearnReport, finetune, load_adapter, tofu_mini
from alter.cli import main
from alter.cli_parser import build_parser
from alter.data import qa_texts
from alter.evaluation import generate
from alter.tiny import build_tokenizer, tiny_llama

QA_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The newcomer's folder: ``mymodel`` (a tiny Llama that memorized the facts, saved
    with save_pretrained), ``forget.jsonl`` / ``retain.jsonl`` (QA rows with paraphrased and
    perturbed answers) and ``texts.jsonl`` / ``unseen.jsonl`` (text rows)."""
    home = tmp_path_factory.mktemp("home")
    data = tofu_mini(num_authors=6, facts_per_author=2, forget_fraction=0.34, seed=1)
    texts = ["the lighthouse keeper painted the door blue every spring .",
             "a quiet village kept its bells in the old tower ."]
    unseen = ["the river mill ground barley for the whole valley .",
              "an old map showed the road across the marsh ."]
    tokenizer = build_tokenizer(qa_texts(data) + texts + unseen)
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48,
                       max_position_embeddings=64, seed=3)
    torch.manual_seed(0)
    finetune(model, tokenizer, datasets.concatenate_datasets([data["forget"], data["retain"]]), epochs=30,
             batch_size=4, lr=1e-2, progress=False)
    model.save_pretrained(home / "mymodel")
    tokenizer.save_pretrained(home / "mymodel")
    for split in ("forget", "retain"):
        write_jsonl(home / f"{split}.jsonl", [{k: row[k] for k in QA_FIELDS} for row in data[split]])
    write_jsonl(home / "texts.jsonl", [{"text": t} for t in texts])
    write_jsonl(home / "unseen.jsonl", [{"text": t} for t in unseen])
    (home / "notamodel").mkdir()
    (home / "notamodel" / "notes.txt").write_text("not a model\n")
    (home / "elsewhere").mkdir()
    return home


def run(argv, capsys):
    """``alter ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


UNLEARN = ["unlearn", "--model", "mymodel", "--forget", "forget.jsonl", "--retain", "retain.jsonl",
           "--batch-size", "2", "--max-steps", "3", "--lr-a", "5e-2", "--lr-b", "5e-2"]


def test_unlearn_eval_load_generate(home, capsys, monkeypatch):
    monkeypatch.chdir(home)  # relative paths, as typed
    code, out, err = run(UNLEARN + ["--out", "out", "--early-stop-share", "none"], capsys)
    assert code == 0, err
    # The default: the sequence route (no router to warm up) on the forget tokens the retain
    # rows do not predict.
    assert "unlearn [alter]: 0 router warm-up steps, then 3 unlearning steps" in out
    assert "labelled tokens the retain rows do not predict" in out
    assert "ended: step cap: max_steps 3" in out
    verdicts = [line for line in out[:out.index("glossary:")].splitlines() if line.strip().startswith("verdict:")]
    assert len(verdicts) == 1 and "forget-token probability" in verdicts[0] and "still predicted" in verdicts[0]
    # Progress: one bar per phase with its own total, the last saying why it ended.
    assert "unlearning steps" in err and "3/3" in err and "step cap" in err
    glossary = out[out.index("glossary:"):]
    for term in ("unlearning steps:", "ended:", "verdict:", "still predicted:", "forget:", "kept:",
                 "retain:", "structural:", "routing:"):
        assert f"\n  {term}" in glossary, term
    report = json.loads((home / "out" / "report.json").read_text())
    assert (report["steps"], report["router_warmup"]) == (3, 0)
    assert report["verdict"] in ("forgotten", "partly forgotten", "not forgotten")
    assert report["verdict"] in (home / "out" / "report.md").read_text()
    record = json.loads((home / "out" / "unlearn_args.json").read_text())
    assert record["base_model"] == str(home / "mymodel")  # resolved, not "mymodel"
    assert (record["forget_file"], record["retain_file"]) == (str(home / "forget.jsonl"), str(home / "retain.jsonl"))
    assert record["steps"] == 3 and record["router_warmup_steps"] == 0

    # From another folder, no data flags: the data the run recorded, not tofu_mini.
    monkeypatch.chdir(home / "elsewhere")
    code, out, err = run(["eval", str(home / "out"), "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert f"on forget {home / 'forget.jsonl'} (4 rows), retain {home / 'retain.jsonl'} (8 rows)" in out
    metrics = json.loads((home / "out" / "eval.json").read_text())
    for key in ("forget_rouge", "retain_rouge", "forget_prob", "retain_prob", "extraction_strength", "mia_min_k",
                "forget_truth_ratio", "model_utility"):
        assert any(k.startswith(key) or k.endswith(key) for k in metrics), key
    assert metrics["mia_nonmembers"] == "retain" and metrics["forget_quality"] is None
    assert 0.0 <= metrics["forget_prob"] <= 1.0 and 0.0 <= metrics["mia_loss"] <= 1.0
    assert "glossary:" in out and "\n  mia: " in out and "\n  extraction_strength: " in out
    assert "alter eval:" in err  # the progress bar over the passes
    # A second eval, on text rows against unseen ones, goes beside the first.
    first = (home / "out" / "eval.json").read_text()
    code, out, err = run(["eval", str(home / "out"), "--forget", str(home / "texts.jsonl"), "--holdout",
                          str(home / "unseen.jsonl"), "--max-new-tokens", "4", "--quiet"], capsys)
    assert code == 0, err
    assert (home / "out" / "eval.json").read_text() == first
    text_metrics = json.loads((home / "out" / "eval-2.json").read_text())
    assert text_metrics["mia_nonmembers"] == "holdout" and "retain_rouge" not in text_metrics
    assert list(text_metrics["glossary"]) == ["rouge", "prob", "extraction_strength", "mia"]  # what it printed
    assert "alter eval:" not in err  # --quiet

    # The Python API on the same files.
    tokenizer = AutoTokenizer.from_pretrained(home / "out")
    base = AutoModelForCausalLM.from_pretrained(home / "mymodel")
    model = load_adapter(AutoModelForCausalLM.from_pretrained(home / "mymodel"), str(home / "out"))
    prompt = f"Question: {json.loads((home / 'forget.jsonl').read_text().splitlines()[0])['question']}\nAnswer:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # the adapter is in effect
    answers = generate(model, tokenizer, [prompt], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_bad_inputs_get_one_line_and_exit_2(home, capsys, monkeypatch):
    monkeypatch.chdir(home)
    out = home / "taken"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"a previous run")
    cases = [
        (UNLEARN + ["--out", "taken"], ["--out taken is not empty", "--overwrite", "--resume"]),
        (UNLEARN + ["--out", "fresh", "--lr-b", "-1e-3"], ["lr_B must be > 0, got -0.001"]),
        (["unlearn", "--model", "notamodel", "--forget", "forget.jsonl", "--out", "fresh"],
         ["notamodel is not a model folder", "config.json", "model.safetensors", "tokenizer.json",
          "save_pretrained"]),
        (["eval", "notamodel"], ["notamodel is not a model folder", "config.json"]),
        (["eval", "mymodel"], ["no data to score", "--forget", "--data tofu_mini"]),
        (["eval", "mymodel", "--forget", "missing.jsonl"], ["no such forget file: missing.jsonl"]),
    ]
    for argv, parts in cases:
        code, stdout, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith(f"alter {argv[0]}: error: "), err
        for part in parts:
            assert part in err, (part, err)
    assert (out / "adapter_model.safetensors").read_bytes() == b"a previous run"  # refused: nothing written
    assert not (home / "fresh").exists()
    code, _, err = run(UNLEARN + ["--out", "taken", "--overwrite", "--max-steps", "1", "--quiet"], capsys)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").read_bytes() != b"a previous run"


def test_every_flag_shows_its_default():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.required or not action.option_strings:
                continue
            assert "default" in (action.help or ""), (name, action.option_strings)


def report(before, after, kept, stopped):
    return UnlearnReport("alter", 10, 0, {}, None, None, before, after, kept, [], stopped, 1.0, "run length")


@pytest.mark.parametrize("after, kept, stopped, verdict", [
    (0.3, 0.2, True, "forgotten"),
    (0.3, 0.5, False, "partly forgotten"),
    (0.95, 0.35, True, "partly forgotten"),  # the early stop fired on a share, the probability barely moved
    (0.95, 0.9, False, "not forgotten"),
])
def test_verdict_follows_the_numbers_and_never_contradicts_the_stop(after, kept, stopped, verdict):
    text = str(report(1.0, after, kept, stopped))
    assert report(1.0, after, kept, stopped).verdict == verdict
    assert f"verdict: {verdict}: forget-token probability 1 -> {after:.3g}" in text
    assert "barely" not in text
