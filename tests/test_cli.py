"""The ``alter`` command line: help of every subcommand (without torch), the flags of
``alter unlearn`` generated from UnlearnArgs, a tiny ``alter unlearn`` and ``alter eval``
round trip on files the test writes, bench delegation and bad input."""
import argparse
import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import transformers

import alter.demo
from alter.cli import main
from alter.data import tofu_mini
from alter.methods import METHODS
from alter.training.args import UnlearnArgs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """TOFU-schema files: forget as JSON lines, the other splits as JSON lists."""
    folder = tmp_path_factory.mktemp("data")
    data = tofu_mini(num_authors=4, facts_per_author=1, forget_fraction=0.5, num_perturbed=2, seed=2)
    for name in ("forget", "retain", "real_authors", "world_facts"):
        rows = data[name].select(range(min(2, len(data[name])))).to_list()
        if name == "forget":
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            (folder / f"{name}.json").write_text(json.dumps(rows))
    return folder


@pytest.mark.parametrize("command, flag", [("demo", "--quick"), ("unlearn", "--forget"), ("eval", "--retain-metrics")])
def test_subcommand_help(command, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: alter {command}" in out and flag in out


def test_top_level_help_lists_the_subcommands():
    # Through `python -m alter`, which also checks alter/__main__.py.
    out = subprocess.run([sys.executable, "-m", "alter", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "unlearn", "eval", "bench"):
        assert command in out


def test_bench_is_delegated(monkeypatch):
    import alter.bench

    seen = []
    monkeypatch.setattr(alter.bench, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "--quick", "--out", "somewhere"]) == 0
    assert main(["bench", "--help"]) == 0
    assert seen == [["--quick", "--out", "somewhere"], ["--help"]]


def test_bench_runs_the_harness_of_the_checkout(monkeypatch, tmp_path, capfd):
    import alter.bench

    assert alter.bench.HARNESS.is_file()  # this is a source checkout
    fake = tmp_path / "harness.py"
    fake.write_text("import sys; print(sys.argv[1:]); sys.exit(3)\n")
    monkeypatch.setattr(alter.bench, "HARNESS", fake)
    assert main(["bench", "--quick", "-k", "route"]) == 3
    assert "['--quick', '-k', 'route']" in capfd.readouterr().out


def test_bench_without_a_checkout_gives_a_clear_message(monkeypatch, tmp_path, capsys):
    import alter.bench

    monkeypatch.setattr(alter.bench, "HARNESS", tmp_path / "site-packages" / "benchmarks" / "harness.py")
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alter bench runs from a source checkout" in err


# ------------------------------------------------------------------- unlearn's flags


def _unlearn_parser():
    from alter.cli_parser import add_unlearn_flags

    parser = argparse.ArgumentParser(prog="alter unlearn")
    add_unlearn_flags(parser)
    return parser


def test_every_unlearn_argument_is_a_flag_with_its_help_and_default():
    from alter.cli_parser import FIELD_FLAGS

    actions = {action.dest: action for action in _unlearn_parser()._actions}
    for field in dataclasses.fields(UnlearnArgs):
        if field.name in ("config", "method_args"):  # built from the config flags / --method-arg KEY=VALUE
            continue
        action = actions[field.name]
        flags = list(FIELD_FLAGS.get(field.name, ["--" + field.name.replace("_", "-")]))
        assert action.option_strings[:len(flags)] == flags
        assert field.metadata["help"] and action.help.startswith(field.metadata["help"])
        assert action.default == field.default
        assert action.required or action.help.endswith("(default: %(default)s)")
        if field.type.startswith("bool"):
            assert "--no-" + field.name.replace("_", "-") in action.option_strings
    assert {"--max-length", "--npo-beta", "--max-grad-norm", "--mixed-precision", "--gradient-checkpointing"} <= {
        flag for action in actions.values() for flag in action.option_strings}


def test_unlearn_flags_give_the_dataclass_defaults_and_parse_every_type():
    from alter.cli import unlearn_args

    parse = _unlearn_parser().parse_args
    required = ["--model", "m", "--forget", "f.jsonl", "--out", "o"]
    assert unlearn_args(parse(required)) == UnlearnArgs(output_dir="o")
    args = unlearn_args(parse(required + [
        "--max-length", "64", "--npo-beta", "0.2", "--max-grad-norm", "none", "--no-mixed-precision",
        "--gradient-checkpointing", "--resume", "--structural", "exact", "--router-lr", "None", "--rank", "2"]))
    assert (args.max_length, args.npo_beta, args.max_grad_norm, args.router_lr) == (64, 0.2, None, None)
    assert (args.mixed_precision, args.gradient_checkpointing, args.resume) == (False, True, True)
    assert args.structural == "exact" and args.config.r == 2 and args.config.backend == "eager"
    # the early stop's share: auto (resolved by the method and forget tokens), a number or none
    for text, share in (("auto", 0.25), ("0.3", 0.3), ("none", None)):
        assert unlearn_args(parse(required + ["--early-stop-share", text])).early_stop_share == share
    args = unlearn_args(parse(required + ["--forget-tokens", "all", "--routing", "token"]))
    assert (args.config.forget_tokens, args.config.routing, args.early_stop_share) == ("all", "token", 0.4)
    # a bool config flag: given, on or off; not given, the config's own value
    assert unlearn_args(parse(required + ["--forget-floor"])).config.forget_floor is True
    assert unlearn_args(parse(required)).config.forget_floor is None
    assert unlearn_args(parse(required + ["--no-forget-floor"])).config.forget_floor is False
    for flag, value in (("--template-tokens", True), ("--no-template-tokens", False)):
        assert unlearn_args(parse(required + [flag])).config.template_tokens is value
    assert unlearn_args(parse(required)).config.template_tokens is False


def test_every_unlearn_argument_is_a_keyword_of_unlearn_and_documented():
    # cmd_unlearn passes the fields as keywords; unlearn's docstring lists them from the fields
    from alter import unlearn

    keywords = set(inspect.signature(unlearn).parameters) - {"run_args"}
    for field in dataclasses.fields(UnlearnArgs):
        assert field.name in keywords or f"``{field.name}`` [{field.default!r}]: {field.metadata['help']}" in unlearn.__doc__


def test_unlearn_refuses_an_unknown_argument_by_name():
    from alter import unlearn

    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['batchsize'\]; the run's arguments are"):
        unlearn(None, None, None, batchsize=4)


@pytest.mark.parametrize("flags, message", [
    (["--lr-b", "-1e-3"], "AlterConfig: lr_B must be > 0, got -0.001"),
    (["--lr", "-1"], "lr must be a positive number or None, got -1.0"),
    (["--max-grad-norm", "-.5"], "max_grad_norm must be a positive number or None, got -0.5"),
    (["--max-length", "-8"], "max_length must be a positive int, got -8"),
    (["--router-warmup", "-2"], "router_warmup must be an int >= 0, got -2"),
])
def test_negative_numbers_reach_validation(flags, message, tmp_path, capsys):
    # before the data is read: the forget file need not exist
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--model", "tiny", "--forget", "missing.jsonl", "--out", str(tmp_path / "o"), *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"alter unlearn: error: {message}\n"


def test_negative_values_are_attached_to_their_flag_only():
    from alter.cli_parser import negative_values_attached

    assert negative_values_attached(["--lr-b", "-1e-3", "--q", "-inf", "--seed", "-1", "-x", "-2"]) == [
        "--lr-b=-1e-3", "--q=-inf", "--seed=-1", "-x", "-2"]
    assert negative_values_attached(["--lr=-1", "-5", "--quiet", "--lr-a"]) == ["--lr=-1", "-5", "--quiet", "--lr-a"]


@pytest.mark.parametrize("argv", [["--help"], ["quality", "--help"], ["unlearn", "--help"], ["demo", "--help"]])
def test_help_imports_no_torch(argv):
    # -X importtime lists every module imported, on stderr
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "alter", *argv], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: alter" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()}
    assert not imported & {"torch", "triton", "transformers", "datasets"}


def test_missing_optional_dependency_names_its_extra(monkeypatch, capsys):
    def no_matplotlib(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(alter.demo, "run_demo", no_matplotlib)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "alter demo: error: matplotlib is not installed: pip install 'alter-kernels[plot]'\n")


def test_unlearn_and_eval_under_the_sequence_route(data_dir, tmp_path):
    out = tmp_path / "alter_out"
    assert main(["unlearn", "--model", "tiny", "--forget", str(data_dir / "forget.jsonl"), "--retain",
                 str(data_dir / "retain.json"), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--rank", "2", "--num-experts", "3", "--routing", "sequence", "--quiet"]) == 0
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["routing"] == "sequence" and adapter_config["route_keys"]
    assert json.loads((out / "unlearn_args.json").read_text())["router_warmup_steps"] == 0
    metrics_file = tmp_path / "m.json"  # loads the adapter with its keys and generates under the route
    assert main(["eval", "--model", str(out), "--data", str(data_dir), "--out", str(metrics_file),
                 "--max-new-tokens", "4"]) == 0
    assert 0.0 <= json.loads(metrics_file.read_text())["model_utility"] <= 1.0


def test_unlearn_then_eval_tiny(data_dir, tmp_path, capsys):
    out = tmp_path / "alter_out"
    forget, retain = str(data_dir / "forget.jsonl"), str(data_dir / "retain.json")
    assert main(["unlearn", "--model", "tiny", "--forget", forget, "--retain", retain, "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--rank", "2", "--num-experts", "3",
                 "--router-lr", "0.02", "--early-stop-share", "none", "--quiet"]) == 0
    run = json.loads((out / "unlearn_args.json").read_text())
    assert run["method"] == "alter" and run["steps"] == 2 and run["router_lr"] == 0.02
    assert run["early_stop_share"] is None
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 2 and adapter_config["num_experts"] == 3
    assert (out / "adapter_model.safetensors").exists() and (out / "base_model" / "config.json").exists()

    metrics_file = tmp_path / "metrics" / "m.json"
    assert main(["eval", "--model", str(out), "--data", str(data_dir), "--out", str(metrics_file),
                 "--max-new-tokens", "8"]) == 0  # short: the default, 200 tokens, takes seconds here
    metrics = json.loads(metrics_file.read_text())
    assert metrics["forget_quality"] is None  # no retain model given
    assert 0.0 <= metrics["model_utility"] <= 1.0 and len(metrics["forget_truth_ratios"]) == 2

    # The same model as its own "retain model": identical truth ratios, KS p-value 1.
    again = tmp_path / "again.json"
    assert main(["eval", "--model", str(out), "--data", str(data_dir), "--retain-metrics", str(metrics_file),
                 "--out", str(again), "--max-new-tokens", "8"]) == 0
    assert json.loads(again.read_text())["forget_quality"] == pytest.approx(1.0)

    # Retain metrics that are not a metrics object: a clear error, exit 2, no traceback.
    ratios_only = tmp_path / "ratios.json"
    ratios_only.write_text(json.dumps(metrics["forget_truth_ratios"]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(out), "--data", str(data_dir), "--retain-metrics", str(ratios_only),
              "--out", str(again)])
    assert exit_info.value.code == 2
    assert "expected a JSON object, got list" in capsys.readouterr().err


def test_unlearn_full_parameter_baseline_without_retain(data_dir, tmp_path):
    out = tmp_path / "ga"
    assert main(["unlearn", "--model", "tiny", "--forget", str(data_dir / "forget.jsonl"), "--method", "grad_ascent",
                 "--out", str(out), "--max-steps", "1", "--quiet"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()


@pytest.mark.parametrize("share", ["1", "-0.5", "most"])
def test_early_stop_share_flag_is_checked_by_the_parser(share, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--model", "tiny", "--forget", "f.jsonl", "--out", str(tmp_path / "o"),
              "--early-stop-share", share])
    assert exit_info.value.code == 2
    assert "--early-stop-share: must be a number in [0, 1), 'auto' or 'none'" in capsys.readouterr().err


def test_bad_data_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no question here"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--model", "tiny", "--forget", str(bad), "--retain", str(bad), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "bad.jsonl: forget[0]: needs 'question' and 'answer' (QA) or 'text'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["unlearn", "--model", "tiny", "--forget", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert "no such data file" in capsys.readouterr().err

    bad.write_text("{not json\n")
    with pytest.raises(SystemExit):
        main(["unlearn", "--model", "tiny", "--forget", str(bad), "--out", str(tmp_path / "o")])
    assert "not JSON or JSON lines" in capsys.readouterr().err


def test_model_that_cannot_be_loaded_is_a_clear_error(data_dir, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--model", str(empty), "--forget", str(data_dir / "forget.jsonl"), "--method", "grad_ascent",
              "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "alter unlearn: error:" in err and "Traceback" not in err

    # A hub name with the hub out of reach: the local cache only, so a clear error at once.
    monkeypatch.setattr("alter.data.hub_reachable", lambda timeout=3.0: False)
    asked = []

    def not_cached(name, **kwargs):  # what transformers raises for a name it cannot fetch
        asked.append(kwargs.get("local_files_only"))
        raise OSError(f"{name} is not in the local cache")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", not_cached)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", not_cached)
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--model", "no-such-org/no-such-model", "--forget", str(data_dir / "forget.jsonl"),
              "--method", "grad_ascent", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "alter unlearn: error: no-such-org/no-such-model is not in the local cache" in capsys.readouterr().err
    assert asked == [True]  # the cache only: no hub retries (they take most of a minute)


def test_demo_quick_writes_table_and_plot(tmp_path, monkeypatch, capsys):
    """The demo pipeline end to end at toy size (the real run is `make demo`)."""
    monkeypatch.setattr(alter.demo, "DEMO_DATA", {"num_authors": 4, "facts_per_author": 1, "forget_fraction": 0.5})
    monkeypatch.setattr(alter.demo, "DEMO_FINETUNE", {"epochs": 5, "batch_size": 8, "lr": 3e-3})
    assert main(["demo", "--quick", "--out", str(tmp_path), "--methods", ",".join(METHODS)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    assert methods == ["retain", "target", *METHODS]
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "forget quality" in out and "model utility" in out


def test_demo_runs_only_the_chosen_methods(tmp_path, monkeypatch):
    import alter.demo

    monkeypatch.setattr(alter.demo, "DEMO_DATA", {"num_authors": 4, "facts_per_author": 1, "forget_fraction": 0.5})
    monkeypatch.setattr(alter.demo, "DEMO_FINETUNE", {"epochs": 2, "batch_size": 8, "lr": 3e-3})
    assert main(["demo", "--quick", "--methods", "npo,grad_ascent@lora", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["retain", "target", "npo", "grad_ascent@lora"]
    assert results["unlearn"] == {"npo": {}, "grad_ascent@lora": {"params": "lora"}}


def test_demo_rejects_unknown_methods(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "alter,sgd", "--out", str(tmp_path)])
    assert "unknown method 'sgd'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "alter@full", "--out", str(tmp_path)])
    assert "does not run on params='full'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        alter.demo.run_demo(str(tmp_path), methods=["sgd"])
    assert not (tmp_path / "results.json").exists()


def test_quality_takes_scenarios_and_runs_by_name(monkeypatch, capsys):
    import alter.quality

    seen = {}
    monkeypatch.setattr(alter.quality, "main", lambda out, **kwargs: seen.update(kwargs))
    assert main(["quality", "--development", "--scenarios", "comets-qa-word,dev-authors-qa", "--seeds", "0",
                 "--methods", "alter,alter-token-routing,npo@lora"]) == 0
    assert [s.name for s in seen["scenarios"]] == ["comets-qa-word", "dev-authors-qa"]
    assert seen["runs"] == ("alter", "alter-token-routing", "npo@lora") and seen["seeds"] == (0,)
    for flag, bad, message in (("--scenarios", "nowhere-qa", "unknown scenarios"),
                               ("--methods", "alter,nomethod", "nomethod")):
        with pytest.raises(SystemExit) as exit_info:
            main(["quality", flag, bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
