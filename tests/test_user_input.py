"""Nothing a user gives is silently lost or silently wrong: data rows, adapter files and
settings, target module names, resume of a changed run, the command line's errors. Each
test here failed before the checks it covers."""
import copy
import dataclasses
import errno
import json
import shutil

import datasets
import pytest
import safetensors.torch
import torch

import alter.methods.params
import alter.methods.npo
import alter.train
from alter.cli import main, read_records
from alter.config import AlterConfig
from alter.data import IGNORE_INDEX, qa_texts, tofu_mini
from alter.model import alter_layers, apply_alter, is_patched, load_adapter, save_adapter
from alter.tiny import build_tokenizer, tiny_llama
from alter.methods.forget_tokens import split_predictable
from alter.train import check_dataset, encode_dataset, unlearn
from test_model import alter_config, randomize_adapters, tiny_model, tokens

CONFIG = AlterConfig(r=2, num_experts=3)
TEXT = "some corpus text about a forgotten author ."


@pytest.fixture(scope="module")
def data():
    return tofu_mini(num_authors=4, facts_per_author=1, forget_fraction=0.5, num_perturbed=1, seed=2)


@pytest.fixture(scope="module")
def tokenizer(data):
    return build_tokenizer(qa_texts(data) + [TEXT])


def small_model(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48,
                      max_position_embeddings=64, seed=3)


def qa_rows(data, split="forget"):
    return [{"question": r["question"], "answer": r["answer"]} for r in data[split]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --------------------------------------------------------------------------- data rows


def test_mixed_qa_and_text_rows_are_each_encoded_as_their_kind(data, tokenizer, tmp_path):
    rows = qa_rows(data) + [{"text": TEXT}]
    table = read_records(write_jsonl(tmp_path / "forget.jsonl", rows))
    examples = encode_dataset(tokenizer, table, "forget", None)
    text = examples[-1]
    # The text row: its own tokens, every one labelled (not "Question: None" with only EOS).
    assert tokenizer.decode(text["input_ids"], skip_special_tokens=True).split() == TEXT.split()
    assert text["labels"] == text["input_ids"]
    for example, row in zip(examples, rows):
        if "question" in row:  # QA rows: the answer labelled, the prompt not
            assert IGNORE_INDEX in example["labels"] and example["labels"][-1] != IGNORE_INDEX


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"question": "Who?", "answer": None}, r"forget\[1\]: 'answer' is missing"),
        ({"question": "Who?", "answer": ""}, r"forget\[1\]: 'answer' is empty"),
        ({"question": "Who?", "answer": " \n\t"}, r"forget\[1\]: 'answer' is empty"),
        ({"question": None, "answer": "Oslo"}, r"forget\[1\]: 'question' is missing"),
        ({"text": ""}, r"forget\[1\]: 'text' is empty"),
        ({"title": "no fields"}, r"forget\[1\]: needs 'question' and 'answer' \(QA\) or 'text'"),
    ],
)
def test_unusable_rows_raise_naming_split_row_and_field(bad, match, data, tokenizer):
    rows = qa_rows(data)[:1] + [bad] + qa_rows(data)[1:]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    forget = datasets.Dataset.from_list([{k: row.get(k) for k in columns} for row in rows])
    with pytest.raises(ValueError, match=match):
        check_dataset(forget, "forget")
    model = small_model(tokenizer)
    with pytest.raises(ValueError, match=match):
        unlearn(model, tokenizer, forget, data["retain"], CONFIG, progress=False)
    assert not is_patched(model)


def test_rows_of_other_types_raise_naming_the_field(data, tmp_path, capsys):
    # Arrow cannot build a table of them: the JSON reader checks the parsed rows first.
    rows = qa_rows(data) + [{"question": "Who?", "answer": 5}]
    with pytest.raises(ValueError, match=rf"forget\[{len(rows) - 1}\]: 'answer' must be a string, got int 5"):
        alter.train.check_rows(rows, "forget")
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(data, "retain"))
    err = cli_error(capsys, ["unlearn", "--model", "tiny", "--forget", write_jsonl(tmp_path / "f.jsonl", rows),
                             "--retain", retain, "--out", str(tmp_path / "o")])
    assert "f.jsonl: forget[2]: 'answer' must be a string, got int 5" in err


@pytest.mark.parametrize("forget_tokens", ["all", "unpredictable"])
def test_unlearn_prints_the_forget_rows_and_tokens_it_targets(forget_tokens, data, tokenizer, capsys):
    config = dataclasses.replace(CONFIG, forget_tokens=forget_tokens)
    unlearn(small_model(tokenizer), tokenizer, data["forget"], data["retain"], config, max_steps=1, batch_size=2)
    forget = encode_dataset(tokenizer, data["forget"], "f", None)
    labelled = sum(lab != IGNORE_INDEX for ex in forget for lab in ex["labels"])
    out = capsys.readouterr().out
    if forget_tokens == "all":
        assert f"targeting {len(data['forget'])} forget rows ({labelled} labelled tokens)" in out
    else:
        split = split_predictable(forget, encode_dataset(tokenizer, data["retain"], "r", None))
        unpredictable = sum(lab != IGNORE_INDEX for ex in split for lab in ex["labels"])
        assert 0 < unpredictable < labelled
        assert (f"targeting {len(split)} forget rows (the {unpredictable} of their {labelled} labelled tokens the "
                "retain rows do not predict)") in out


def test_forget_rows_also_in_the_retain_set_are_counted_in_a_warning(data, tokenizer, tmp_path):
    forget_rows = qa_rows(data) + [{"text": TEXT}]
    other_answer = {**forget_rows[1], "answer": "another answer"}  # a question alone is not the row
    retain_rows = qa_rows(data, "retain") + [forget_rows[0], other_answer, {"text": TEXT}]
    forget = read_records(write_jsonl(tmp_path / "forget.jsonl", forget_rows))
    retain = read_records(write_jsonl(tmp_path / "retain.jsonl", retain_rows))
    with pytest.warns(UserWarning, match=rf"2 of the {len(forget_rows)} forget rows are also in the retain set: "
                                         r"the forget loss pushes .* drop them from one of the sets"):
        unlearn(small_model(tokenizer), tokenizer, forget, retain, CONFIG, max_steps=1, batch_size=2, progress=False)


def test_cli_rejects_a_bad_row_before_any_work(data, tmp_path, capsys):
    forget = write_jsonl(tmp_path / "forget.jsonl", qa_rows(data) + [{"question": "Who?", "answer": None}])
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(data, "retain"))
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--model", "tiny", "--forget", forget, "--retain", retain, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"forget.jsonl: forget[{len(data['forget'])}]: 'answer' is missing" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- adapter files


def fail_like_a_full_disk(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\0" * 100)  # a partial file, as a full disk leaves
    raise OSError(errno.ENOSPC, "No space left on device")


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    base = tiny_model()
    model = apply_alter(copy.deepcopy(base), alter_config(r=4))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    before = snapshot(tmp_path / "adapter")
    ids = tokens()
    expected = model(input_ids=ids).logits

    other = apply_alter(tiny_model(), alter_config(r=2, k_high=2))
    monkeypatch.setattr(safetensors.torch, "save_file", fail_like_a_full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(other, tmp_path / "adapter")
    monkeypatch.undo()
    assert snapshot(tmp_path / "adapter") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directory left
    assert torch.equal(load_adapter(base, tmp_path / "adapter")(input_ids=ids).logits, expected)


def test_a_failed_final_save_of_unlearn_leaves_the_previous_outputs(data, tokenizer, tmp_path, monkeypatch):
    common = dict(method="alter", max_steps=1, batch_size=2, progress=False, output_dir=str(tmp_path))
    unlearn(small_model(tokenizer), tokenizer, data["forget"], data["retain"], CONFIG, **common)
    before = snapshot(tmp_path)

    def tokenizer_save_fails(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", tokenizer_save_fails)
    with pytest.raises(OSError, match="No space left"):
        unlearn(small_model(tokenizer), tokenizer, data["forget"], data["retain"], AlterConfig(r=3, num_experts=3),
                **common)
    assert snapshot(tmp_path) == before


def test_saving_the_same_adapter_gives_the_same_bytes(tmp_path):
    """A resumed run must write the same files as an uninterrupted one (safetensors writes
    a metadata map of several entries in a random order)."""
    model = apply_alter(tiny_model(), alter_config(r=2, target_modules=["q_proj"]))
    saved = set()
    for i in range(6):
        save_adapter(model, tmp_path / str(i))
        saved.add(tuple(snapshot(tmp_path / str(i)).items()))
    assert len(saved) == 1


def trained_adapter(tmp_path, **settings):
    """An unpatched base model, input ids, and the logits of that model on them with an
    adapter trained under ``settings``, saved into ``tmp_path``."""
    base = tiny_model()
    model = apply_alter(copy.deepcopy(base), alter_config(r=4, num_experts=3, **settings))
    randomize_adapters(model, 0.5)
    save_adapter(model, tmp_path)
    ids = tokens()
    return base, ids, model(input_ids=ids).logits


def test_load_into_a_patched_model_adopts_the_trained_settings(tmp_path):
    trained = dict(k_high=2, tau_high=0.5, entropy_threshold=1.0, entropy_source="lagged")
    base, ids, expected = trained_adapter(tmp_path, **trained)
    model = apply_alter(base, alter_config(r=4, num_experts=3))  # k_high=3, prepass, ...
    with pytest.warns(UserWarning, match=r"k_high: 3 -> 2.*entropy_source: 'prepass' -> 'lagged'"):
        load_adapter(model, tmp_path)
    assert torch.equal(model(input_ids=ids).logits, expected)
    assert model.alter_config == alter_config(r=4, num_experts=3, **trained)


def test_load_into_a_model_patched_with_another_alpha_is_refused(tmp_path):
    trained_adapter(tmp_path)
    model = apply_alter(tiny_model(), alter_config(r=4, num_experts=3, alpha=8.0))
    with pytest.raises(ValueError, match="patched with alpha=8.0, the adapter alpha=16.0"):
        load_adapter(model, tmp_path)
    assert all(not layer.lora_B.any() for layer in alter_layers(model).values())  # nothing copied


def test_an_edited_adapter_config_is_refused(tmp_path):
    trained_adapter(tmp_path, k_high=2)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"k_high": 2', '"k_high": 3'))
    model = tiny_model()
    with pytest.raises(ValueError, match=r"does not match the config the weights were saved with: k_high=3 \(trained with 2\)"):
        load_adapter(model, tmp_path)
    assert not is_patched(model)


def test_corrupted_weights_are_refused(tmp_path):
    trained_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # a bit of a tensor's value: still a valid file
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is corrupted: its tensors do not match the checksum"):
        load_adapter(tiny_model(), tmp_path)
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_adapter(tiny_model(), tmp_path)


# ----------------------------------------------------------------------- target names


def test_a_target_module_typo_next_to_a_valid_name_raises():
    with pytest.raises(ValueError, match=r"target_modules \['v_porj'\] match no nn.Linear module of LlamaForCausalLM; "
                                         r"its linear modules are named \[.*'v_proj'"):
        apply_alter(tiny_model(), alter_config(target_modules=["q_proj", "v_porj"]))
    # A user list must match everywhere; the default list (several architectures) need not.
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no nn.Linear module"):
        apply_alter(tiny_model(), alter_config(target_modules=["q_proj", "qkv_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in alter_layers(apply_alter(tiny_model(), alter_config()))} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ----------------------------------------------------------------------------- resume


def no_forward(*args, **kwargs):
    raise AssertionError("the model ran before the run's inputs were checked")


@pytest.mark.parametrize("change, match", [
    (dict(max_grad_norm=0.5), r"max_grad_norm: 1.0 -> 0.5"),
    (dict(max_length=60), r"max_length: None -> 60"),
    (dict(method_args={"beta": 0.2}), r"method_args.beta: None -> 0.2"),
    (dict(forget="changed"), r"data_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"),
])
def test_resume_refuses_changed_args_or_data_before_any_forward(change, match, data, tokenizer, tmp_path, monkeypatch):
    common = dict(method="npo", batch_size=2, progress=False, output_dir=str(tmp_path))
    unlearn(small_model(tokenizer), tokenizer, data["forget"], data["retain"], CONFIG, max_steps=1, save_every=1,
            **common)
    forget = data["forget"]
    if change.pop("forget", None):
        forget = forget.map(lambda row, i: {"answer": row["answer"] if i else "Oslo ."}, with_indices=True)
    monkeypatch.setattr(alter.methods.npo, "reference_logprobs", no_forward)
    monkeypatch.setattr(alter.methods.params, "base_model_pass", no_forward)
    with pytest.raises(ValueError, match="written by a different run .*" + match):
        unlearn(small_model(tokenizer), tokenizer, forget, data["retain"], **{"config": CONFIG, **common, **change},
                resume=True)


# -------------------------------------------------------------------------------- CLI


@pytest.fixture()
def files(data, tmp_path):
    return write_jsonl(tmp_path / "forget.jsonl", qa_rows(data)), write_jsonl(tmp_path / "retain.jsonl", qa_rows(data, "retain"))


def cli_error(capsys, argv) -> str:
    """The stderr of a command that must fail as a user error: exit 2, one line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    # The error is the last line (transformers may draw a progress bar before it).
    assert "Traceback" not in err and err.endswith("\n") and f"alter {argv[0]}: error: " in err.splitlines()[-1], err
    return err.splitlines()[-1]


def test_cli_checks_device_backend_and_out_before_any_work(files, tmp_path, capsys, monkeypatch):
    forget, retain = files
    out = tmp_path / "o"
    base = ["unlearn", "--model", "tiny", "--forget", forget, "--retain", retain, "--out", str(out), "--quiet"]
    assert "--device nodevice: not usable here" in cli_error(capsys, base + ["--device", "nodevice"])
    assert "--device cuda:7: not usable here" in cli_error(capsys, base + ["--device", "cuda:7"])
    assert "--backend cpp: the 'alter' adapters need route and asym_lora" in cli_error(capsys, base + ["--backend", "cpp"])
    monkeypatch.setattr("alter_kernels._dispatch.unavailable_reason", lambda backend, device: "no GPU here")
    assert "--backend='triton' is unavailable on cpu: no GPU here" in cli_error(
        capsys, base + ["--backend", "triton", "--device", "cpu"])
    monkeypatch.undo()
    assert "epochs must be a positive int" in cli_error(capsys, base + ["--epochs", "0"])
    assert not out.exists()  # nothing was written
    (tmp_path / "a_file").write_text("")
    assert "a_file is a file, not a directory" in cli_error(capsys, base[:-3] + ["--out", str(tmp_path / "a_file" / "o")])
    bad_config = tmp_path / "config.json"
    bad_config.write_text("{r: 4}")
    assert f"{bad_config}: not valid JSON" in cli_error(capsys, base + ["--config", str(bad_config)])


def test_cli_resume_refuses_changed_data_and_a_corrupt_checkpoint(files, data, tmp_path, capsys, monkeypatch):
    forget, retain = files
    out = tmp_path / "o"
    argv = ["unlearn", "--model", "tiny", "--forget", forget, "--retain", retain, "--out", str(out), "--quiet",
            "--max-steps", "1", "--batch-size", "2", "--rank", "2", "--num-experts", "3", "--save-every", "1"]
    assert main(argv) == 0
    monkeypatch.setattr(alter.methods.params, "base_model_pass", no_forward)
    rows = qa_rows(data)
    rows[0]["answer"] = rows[1]["answer"]  # same words (same tiny vocabulary), other data
    write_jsonl(tmp_path / "forget.jsonl", rows)
    assert "written by a different run (data_sha256:" in cli_error(capsys, argv + ["--resume"])
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "checkpoint.pt is not a readable checkpoint" in cli_error(capsys, argv + ["--resume"])


def test_cli_records_the_base_model_as_given_and_eval_can_override_it(files, data, tmp_path, capsys, monkeypatch):
    forget, retain = files
    folder = tmp_path / "tofu"
    folder.mkdir()
    for name in ("forget", "retain", "real_authors", "world_facts"):
        (folder / f"{name}.json").write_text(json.dumps(data[name].select(range(1)).to_list()))
    common = ["--forget", forget, "--retain", retain, "--quiet", "--max-steps", "1", "--batch-size", "2",
              "--rank", "2", "--num-experts", "3"]
    # --model tiny: the base model inside the output, recorded relative to it, so the output can move.
    assert main(["unlearn", "--model", "tiny", "--out", str(tmp_path / "tiny_out"), *common]) == 0
    assert json.loads((tmp_path / "tiny_out" / "unlearn_args.json").read_text())["base_model"] == "base_model"
    shutil.move(tmp_path / "tiny_out", tmp_path / "moved")
    assert main(["eval", "--model", str(tmp_path / "moved"), "--data", str(folder), "--out", str(tmp_path / "m.json")]) == 0

    # A base model directory given relatively is recorded resolved: eval finds it from anywhere.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tmp_path / "moved" / "base_model", tmp_path / "base")
    assert main(["unlearn", "--model", "base", "--out", "run", *common]) == 0
    assert json.loads((tmp_path / "run" / "unlearn_args.json").read_text())["base_model"] == str(tmp_path / "base")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    eval_argv = ["eval", "--model", "../run", "--data", str(folder), "--out", "m.json"]
    assert main(eval_argv) == 0
    # Moved away, it is named, with the flag that overrides it.
    shutil.move(tmp_path / "base", tmp_path / "base_moved")
    err = cli_error(capsys, eval_argv)
    assert f"the base model {tmp_path / 'base'} (recorded in ../run/unlearn_args.json)" in err and "--base-model" in err
    assert main(eval_argv + ["--base-model", "../base_moved"]) == 0


def test_cli_corrupted_adapter_or_model_weights_are_user_errors(files, tmp_path, capsys):
    forget, retain = files
    out = tmp_path / "o"
    assert main(["unlearn", "--model", "tiny", "--forget", forget, "--retain", retain, "--out", str(out), "--quiet",
                 "--max-steps", "1", "--batch-size", "2", "--rank", "2", "--num-experts", "3"]) == 0
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    err = cli_error(capsys, ["eval", "--model", str(out), "--out", str(tmp_path / "m.json")])
    assert "adapter_model.safetensors is not a readable safetensors file" in err
    base_weights = out / "base_model" / "model.safetensors"
    base_weights.write_bytes(base_weights.read_bytes()[:-100])
    err = cli_error(capsys, ["unlearn", "--model", str(out / "base_model"), "--forget", forget, "--method", "npo",
                             "--out", str(tmp_path / "o2")])
    assert f"{out / 'base_model'}: the model's weights cannot be read" in err


# ----------------------------------------------------------------------- generation


def test_remove_alter_takes_the_beam_reorder_off():
    model = apply_alter(tiny_model(), alter_config(entropy_source="lagged"))
    prompt = tokens(seq=6)
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, num_beams=2, do_sample=False)
    assert "_reorder_cache" in vars(model)
    from alter.model import remove_alter

    remove_alter(model)
    assert "_reorder_cache" not in vars(model)


def test_cli_preset_paper_reaches_the_adapter_and_excludes_config(files, tmp_path, capsys):
    """--preset paper starts from AlterConfig.paper() (flags still override it); with
    --config as well it is a user error."""
    forget, retain = files
    out = tmp_path / "paper"
    base = ["unlearn", "--model", "tiny", "--forget", forget, "--retain", retain, "--quiet", "--max-steps", "1",
            "--batch-size", "2"]
    assert main(base + ["--out", str(out), "--preset", "paper", "--rank", "2"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    paper = AlterConfig.paper()
    assert saved["r"] == 2 and saved["a_learns_from_high_entropy_only"]
    assert (saved["lr_A"], saved["lr_B"], saved["train_routes"]) == (paper.lr_A, paper.lr_B, paper.train_routes)
    config_file = tmp_path / "c.json"
    AlterConfig().to_json_file(config_file)
    assert "--preset paper and --config both give the starting config" in cli_error(
        capsys, base + ["--out", str(tmp_path / "o2"), "--preset", "paper", "--config", str(config_file)])
