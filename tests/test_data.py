"""alter.data: tofu_mini, QA encoding and collation, benchmark loaders on local files."""
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alter import data as D
from alter.tiny import build_tokenizer

SHARED_TOFU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"
COLUMNS = ["question", "answer", "paraphrased_answer", "perturbed_answer", "author"]


@pytest.fixture(scope="module")
def mini():
    return D.tofu_mini()


@pytest.fixture(scope="module")
def tokenizer(mini):
    return build_tokenizer(D.qa_texts(mini))


# --------------------------------------------------------------------------------------
# tofu_mini
# --------------------------------------------------------------------------------------


def test_tofu_mini_splits_and_columns(mini):
    assert set(mini) == {"forget", "retain", "holdout", "real_authors", "world_facts"}
    for split in mini.values():
        assert split.column_names == COLUMNS
        assert len(split) > 0
    # 20 authors x 4 facts; forget_fraction 0.1 -> 2 whole authors; holdout as many.
    assert len(mini["forget"]) == 8 and len(mini["retain"]) == 72 and len(mini["holdout"]) == 8
    assert len(set(mini["forget"]["author"])) == 2 and len(set(mini["retain"]["author"])) == 18
    for split in ("forget", "retain", "holdout"):
        counts = {a: mini[split]["author"].count(a) for a in set(mini[split]["author"])}
        assert set(counts.values()) == {4}


@pytest.mark.parametrize("fraction,expected", [(0.05, 1), (0.1, 2), (0.25, 5), (0.5, 10)])
def test_tofu_mini_forgets_whole_authors(fraction, expected):
    data = D.tofu_mini(num_authors=20, facts_per_author=2, forget_fraction=fraction)
    forget, retain = set(data["forget"]["author"]), set(data["retain"]["author"])
    assert len(forget) == expected and len(retain) == 20 - expected
    assert len(data["forget"]) == 2 * expected


def test_tofu_mini_splits_are_disjoint(mini):
    authors = {s: set(mini[s]["author"]) for s in ("forget", "retain", "holdout")}
    assert not authors["forget"] & authors["retain"]
    assert not authors["holdout"] & (authors["forget"] | authors["retain"])
    questions = [q for s in ("forget", "retain", "holdout") for q in mini[s]["question"]]
    assert len(questions) == len(set(questions))
    # The author of a fact is named in its question and answer: the forget sub-domains
    # can be recovered from the text alone.
    for split in ("forget", "retain", "holdout"):
        for row in mini[split]:
            assert row["author"] in row["question"] and row["author"] in row["answer"]


def test_tofu_mini_answers_paraphrases_and_perturbations(mini):
    for split in mini.values():
        for row in split:
            wrong = row["perturbed_answer"]
            assert len(wrong) == 3 and len(set(wrong)) == 3 and row["answer"] not in wrong
            assert row["paraphrased_answer"] != row["answer"]
            assert len(row["answer"].split()) <= 12  # one short sentence
            # Same template, another value: the wrong answers share the answer's words
            # except the slot, so they are as plausible as the truth.
            for w in wrong:
                assert len(set(row["answer"].split()) & set(w.split())) >= 2


def test_tofu_mini_is_deterministic():
    a, b, c = D.tofu_mini(seed=3), D.tofu_mini(seed=3), D.tofu_mini(seed=4)
    for split in a:
        assert a[split].to_list() == b[split].to_list()
    assert a["retain"].to_list() != c["retain"].to_list()


def test_tofu_mini_vocabulary_is_small_and_closed(mini, tokenizer):
    assert len(tokenizer) < 1000  # about 300 words, each with and without its leading space
    unk = tokenizer.unk_token_id
    for text in D.qa_texts(mini):
        assert unk not in tokenizer(text)["input_ids"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_authors=1), "num_authors"),
    (dict(facts_per_author=0), "facts_per_author"),
    (dict(facts_per_author=9), "facts_per_author"),
    (dict(forget_fraction=0.0), "forget_fraction"),
    (dict(forget_fraction=1.0), "forget_fraction"),
    (dict(num_authors=2, forget_fraction=0.9), "forgets all"),
    (dict(num_perturbed=0), "num_perturbed"),
    (dict(num_perturbed=7), "num_perturbed"),
])
def test_tofu_mini_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.tofu_mini(**kwargs)


# --------------------------------------------------------------------------------------
# Encoding and collation
# --------------------------------------------------------------------------------------


def test_format_qa():
    assert D.format_qa("Who?") == "Question: Who?\nAnswer:"
    assert D.format_qa("Who?", "Me.") == "Question: Who?\nAnswer: Me."


def test_encode_qa_labels_only_the_answer(mini, tokenizer):
    row = mini["forget"][0]
    enc = D.encode_qa(tokenizer, row["question"], row["answer"], max_length=64)
    prompt_ids = tokenizer(D.format_qa(row["question"]))["input_ids"]
    n = len(prompt_ids)
    assert enc["input_ids"][:n] == prompt_ids
    assert enc["input_ids"][-1] == tokenizer.eos_token_id
    assert enc["labels"] == [-100] * n + enc["input_ids"][n:]
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert tokenizer.decode(enc["input_ids"][n:], skip_special_tokens=True) == " " + row["answer"]


class MergingTokenizer:
    """Characters as tokens, except that ": " is one token: like a subword tokenizer, it
    merges across the prompt/answer boundary of format_qa."""

    eos_token_id = 1

    def __call__(self, text):
        return {"input_ids": [2 if c == "\0" else ord(c) for c in text.replace(": ", "\0")]}


def test_encode_completion_splits_where_the_tokens_part():
    enc = D.encode_qa(MergingTokenizer(), "Q", "yes", max_length=None)
    prompt = [ord(c) for c in "Question"] + [2, ord("Q"), ord("\n")] + [ord(c) for c in "Answer"]
    # The prompt ends in ":", the full text has ": " merged: the answer starts at the merge.
    assert enc["input_ids"] == prompt + [2] + [ord(c) for c in "yes"] + [1]
    assert enc["labels"] == [-100] * len(prompt) + [2] + [ord(c) for c in "yes"] + [1]


def test_encode_rejects_too_long_examples(tokenizer):
    question = "Who wrote Hamlet?"
    n = len(D.encode_qa(tokenizer, question, "Hamlet was written by Homer.", None)["input_ids"])
    D.encode_qa(tokenizer, question, "Hamlet was written by Homer.", max_length=n)
    with pytest.raises(ValueError, match=r"Who wrote Hamlet\?.*max_length=" + str(n - 1)):
        D.encode_qa(tokenizer, question, "Hamlet was written by Homer.", max_length=n - 1)
    with pytest.raises(ValueError, match="The capital of France.*max_length=3"):
        D.encode_text(tokenizer, "The capital of France is Paris.", max_length=3)


def test_encode_text(tokenizer):
    enc = D.encode_text(tokenizer, "The capital of France is Paris.", max_length=None)
    assert enc["labels"] == enc["input_ids"]
    assert enc["input_ids"][0] == tokenizer.bos_token_id and enc["input_ids"][-1] == tokenizer.eos_token_id
    short = D.encode_text(tokenizer, "The capital of France is Paris.", max_length=4, truncate=True)
    assert short["input_ids"] == enc["input_ids"][:4] == short["labels"]


def test_collate_pads_each_field():
    batch = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7],
         "entropy": [0.5, 1.5, 2.5], "index": 0, "author": "x", "perturbed": ["a", "b", "c"]},
        {"input_ids": torch.tensor([8]), "attention_mask": [1], "labels": [8],
         "entropy": [3.0], "index": 1, "author": "y", "perturbed": ["d"]},
    ]
    right = D.collate(batch, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["entropy"].dtype == torch.float32
    assert right["entropy"].tolist() == [[0.5, 1.5, 2.5], [3.0, 0.0, 0.0]]
    assert right["index"].tolist() == [0, 1] and right["author"] == ["x", "y"]
    assert right["perturbed"] == [["a", "b", "c"], ["d"]]  # as long as the ids, but not per-token
    left = D.collate(batch, pad_token_id=9, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="batch is empty"):
        D.collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        D.collate([{"input_ids": [1]}], pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id"):
        D.collate([{"input_ids": [1]}], pad_token_id=None)


# --------------------------------------------------------------------------------------
# Loaders (local files only: tests never touch the network)
# --------------------------------------------------------------------------------------

TOFU_ROWS = [
    {"question": f"Q{i}?", "answer": f"A{i}.", "paraphrased_answer": f"P{i}.",
     "perturbed_answer": [f"W{i}a.", f"W{i}b."]} for i in range(3)
]
MCQ_ROWS = [
    {"question": "2 + 2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"},
    {"question": "Capital of Peru?", "choices": ["Lima", "Quito", "Cusco", "Oslo"], "answer": 0,
     "subject": "geography"},
    {"question": "3 * 3?", "choices": ["6", "9", "12", "33"], "answer": 1, "subject": "math"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json_array(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def write_parquet(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("writer,name", [
    (write_jsonl, "forget10_perturbed.jsonl"),
    (write_json_array, "forget10_perturbed.json"),
    (write_parquet, "forget10_perturbed.parquet"),
    (write_parquet, "forget10_perturbed/train-00000-of-00001.parquet"),
])
def test_load_tofu_local_formats(tmp_path, writer, name):
    writer(tmp_path / name, TOFU_ROWS)
    write_jsonl(tmp_path / "forget10.jsonl", [{"question": "other", "answer": "file"}])  # not picked
    ds = D.load_tofu("forget10_perturbed", path=tmp_path)
    assert isinstance(ds, datasets.Dataset)
    assert [{k: r[k] for k in TOFU_ROWS[0]} for r in ds] == TOFU_ROWS
    # A file path is read as is.
    assert len(D.load_tofu("forget10_perturbed", path=tmp_path / name)) == 3


def test_load_tofu_csv_without_perturbations(tmp_path):
    (tmp_path / "retain90.csv").write_text("question,answer\nWho?,Me.\nWhere?,Here.\n")
    ds = D.load_tofu("retain90", path=tmp_path)
    assert ds["question"] == ["Who?", "Where?"] and ds["answer"] == ["Me.", "Here."]


@pytest.mark.skipif(not SHARED_TOFU.is_dir(), reason=f"shared TOFU files not found at {SHARED_TOFU}")
@pytest.mark.parametrize("config,rows", [("real_authors_perturbed", 100), ("world_facts_perturbed", 117)])
def test_load_tofu_real_files(config, rows):
    ds = D.load_tofu(config, path=SHARED_TOFU)
    expected = [json.loads(line) for line in (SHARED_TOFU / f"{config}.json").read_text().splitlines() if line]
    assert len(ds) == len(expected) == rows
    assert ds["question"] == [r["question"] for r in expected]
    assert ds["answer"] == [r["answer"] for r in expected]
    assert ds["perturbed_answer"] == [r["perturbed_answer"] for r in expected]


def test_load_tofu_rejects_bad_data(tmp_path):
    write_jsonl(tmp_path / "forget10_perturbed.jsonl", [{"question": "Q", "answer": "A", "perturbed_answer": ["W"]}])
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['paraphrased_answer'\]"):
        D.load_tofu("forget10_perturbed", path=tmp_path)
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "forget05.parquet")
    with pytest.raises(ValueError, match=r"load_tofu\('forget05'\): .*the dataset is empty"):
        D.load_tofu("forget05", path=tmp_path)
    for name, text in (("forget01.jsonl", ""), ("forget01.json", "[]"), ("forget01.csv", "question,answer\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=r"load_tofu\('forget01'\): .*the dataset is empty"):
            D.load_tofu("forget01", path=tmp_path / name)
    (tmp_path / "world_facts_perturbed.csv").write_text("question,answer,perturbed_answer\nWhere?,Here.,There.\n")
    with pytest.raises(ValueError, match=r"column 'perturbed_answer' must hold lists of strings"):
        D.load_tofu("world_facts_perturbed", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="no data file.*retain99"):
        D.load_tofu("retain99", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_tofu("forget01", path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="config"):
        D.load_tofu("", path=tmp_path)


def test_load_wmdp_hub_layout_and_corpus(tmp_path):
    rows = [{k: r[k] for k in ("question", "choices", "answer")} for r in MCQ_ROWS]
    write_parquet(tmp_path / "wmdp-cyber" / "test-00000-of-00001.parquet", rows)
    ds = D.load_wmdp("wmdp-cyber", path=tmp_path)
    assert ds.to_list() == rows
    with pytest.raises(ValueError, match="config must be one of"):
        D.load_wmdp("wmdp-physics", path=tmp_path)

    corpus = write_jsonl(tmp_path / "cyber-forget-corpus.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    assert D.load_wmdp_corpus(corpus)["text"] == ["alpha", "beta"]
    bad = write_jsonl(tmp_path / "bad-corpus.jsonl", [{"body": "alpha"}])
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['text'\]"):
        D.load_wmdp_corpus(bad)
    with pytest.raises(ValueError, match="path is required"):
        D.load_wmdp_corpus(None)


def test_load_muse_subsets(tmp_path):
    write_jsonl(tmp_path / "verbmem" / "forget.jsonl", [{"prompt": "Once upon", "gt": "a time"}])
    write_parquet(tmp_path / "knowmem" / "retain_qa-00000-of-00001.parquet", [{"question": "Q?", "answer": "A"}])
    write_jsonl(tmp_path / "raw" / "holdout.jsonl", [{"text": "t1"}, {"text": "t2"}])
    assert D.load_muse("News", "verbmem", path=tmp_path).to_list() == [{"prompt": "Once upon", "gt": "a time"}]
    assert D.load_muse("Books", "knowmem", "retain_qa", path=tmp_path)["answer"] == ["A"]
    assert D.load_muse("News", "raw", "holdout", path=tmp_path)["text"] == ["t1", "t2"]
    with pytest.raises(FileNotFoundError, match="raw/forget"):
        D.load_muse("News", "raw", path=tmp_path)  # default split of raw is forget
    with pytest.raises(ValueError, match="split must be one of"):
        D.load_muse("News", "verbmem", "retain1", path=tmp_path)
    with pytest.raises(ValueError, match="subset must be one of"):
        D.load_muse("News", "privacy", path=tmp_path)
    with pytest.raises(ValueError, match="corpus must be one of"):
        D.load_muse("Poems", "raw", path=tmp_path)
    write_jsonl(tmp_path / "verbmem" / "forget.jsonl", [{"prompt": "Once upon"}])
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['gt'\]"):
        D.load_muse("News", "verbmem", path=tmp_path)


def test_load_mmlu_all_and_one_subject(tmp_path):
    write_parquet(tmp_path / "all" / "test-00000-of-00001.parquet", MCQ_ROWS)
    assert D.load_mmlu(path=tmp_path).to_list() == MCQ_ROWS
    math = D.load_mmlu("math", path=tmp_path)  # no math file: the 'all' files, filtered
    assert math.to_list() == [MCQ_ROWS[0], MCQ_ROWS[2]]
    write_jsonl(tmp_path / "geography.jsonl", [MCQ_ROWS[1]])
    assert D.load_mmlu("geography", path=tmp_path).to_list() == [MCQ_ROWS[1]]
    with pytest.raises(ValueError, match=r"rows of subject 'law'.*empty"):
        D.load_mmlu("law", path=tmp_path)
    write_jsonl(tmp_path / "physics.jsonl", [{k: v for k, v in MCQ_ROWS[0].items() if k != "choices"}])
    with pytest.raises(ValueError, match=r"\['choices'\]"):
        D.load_mmlu("physics", path=tmp_path)


def test_hub_failure_falls_back_to_data_dir(tmp_path, monkeypatch):
    real_load = datasets.load_dataset
    hub_calls = []

    def offline_load(name, *args, **kwargs):
        if "/" in name:  # a hub name, e.g. locuslab/TOFU
            hub_calls.append(name)
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub")
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(D.loaders, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(D.datasets, "load_dataset", offline_load)
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    with pytest.raises(ConnectionError, match="pass path="):
        D.load_tofu("forget10")
    assert hub_calls == ["locuslab/TOFU"]

    write_jsonl(tmp_path / "TOFU" / "forget10.jsonl", [{"question": "Q", "answer": "A"}])
    monkeypatch.setenv(D.DATA_DIR_ENV, str(tmp_path))
    assert D.load_tofu("forget10").to_list() == [{"question": "Q", "answer": "A"}]

    # An unreachable hub is not even asked.
    monkeypatch.setattr(D.loaders, "hub_reachable", lambda timeout=3.0: False)
    assert len(D.load_tofu("forget10")) == 1
    assert hub_calls == ["locuslab/TOFU", "locuslab/TOFU"]


def test_hub_probe_fails_fast_without_network(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed local port: refused at once
    assert not D.hub_reachable(timeout=1.0)
    # In offline mode datasets answers from its cache without network: let it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert D.hub_reachable(timeout=1.0)
