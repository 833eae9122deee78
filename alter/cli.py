"""The ``alter`` command: ``demo``, ``unlearn``, ``eval`` (:mod:`alter.cli_eval`), ``quality``
and ``bench`` (their flags: :mod:`alter.cli_parser`).

``alter unlearn`` writes into ``--out`` (refused when it is not empty, unless
``--overwrite`` or ``--resume``) either an adapter (``adapter_config.json`` +
``adapter_model.safetensors``, for the adapter methods) or a full model (for the
full-parameter baselines), the tokenizer, the run report (``report.md``, ``report.json``)
and ``unlearn_args.json`` recording the method, the base model and the data files,
resolved (local paths absolute, hub ids as given). With ``--model tiny`` the base model is
a small random Llama built for the data (for trying the pipeline), saved under
``--out/base_model`` and recorded as ``base_model``, relative to the output directory, so
that the directory can be moved. ``alter eval`` reads such a directory back; a relative
recorded base model is looked for in the output directory first, then as given, and
``--base-model`` overrides it.

Every user error (bad data rows or files, a folder that is not a model, an unavailable
backend or device, an unwritable or non-empty ``--out``, a checkpoint of another run or
data, a corrupted adapter) ends the command with one line on stderr and exit status 2,
before the first forward of the model; so does a missing optional dependency, naming the
extra that installs it (``alter-kernels[eval]``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from alter.cli_parser import TINY, build_parser, config_overrides, negative_values_attached
from alter.files import first_line

BASE_MODEL_DIR = "base_model"
# The optional modules a command may need -> the extra of setup.py that installs them.
EXTRAS = {"rouge_score": "eval", "matplotlib": "plot", "accelerate": "distributed"}


def read_rows(path: str) -> list[dict]:
    """The rows (JSON objects) of a JSON-lines file or of a JSON file holding a list."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON or JSON lines ({exc})") from exc
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: every row must be a JSON object")
    return rows


def read_records(path: str, rows: list[dict] | None = None):
    """A ``datasets.Dataset`` of the rows of ``path`` (:func:`read_rows`, or ``rows``
    when already read). Its columns are every key of any row, a row lacking one holding
    None there: ``Dataset.from_list`` alone takes the first row's keys and drops the others."""
    import datasets

    rows = read_rows(path) if rows is None else rows
    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        return datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])
    except (ValueError, TypeError) as exc:  # pyarrow: a column holding values of several types
        raise ValueError(f"{path}: the rows do not form a table ({exc})") from exc


def training_records(path: str, name: str):
    """A forget or retain set, every row checked (:func:`alter.methods.data.check_rows`) first."""
    from alter.methods.data import check_rows

    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: {name} is empty: unlearning needs at least one example")
    try:
        check_rows(rows, name)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return read_records(path, rows)


def _device(spec: str | None):
    """The torch device of ``--device`` (default: cuda when available), checked usable."""
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # AssertionError: torch built without CUDA
        raise ValueError(f"--device {spec}: not usable here ({first_line(exc)})") from exc
    return device


def _check_backend(config, method: str, device, params: str | None = None) -> None:
    """The backend asked for (``--backend`` / the config, or ``ALTER_BACKEND``) runs on ``device``."""
    from alter.methods import method_class
    from alter_kernels import BACKENDS, available_backends

    for source, backend in (("--backend", config.backend), ("ALTER_BACKEND", os.environ.get("ALTER_BACKEND") or None)):
        if backend is None:
            continue
        if backend not in BACKENDS:
            raise ValueError(f"{source}={backend!r} is not one of {BACKENDS}")
        why = available_backends(device)[backend]
        if why:
            raise ValueError(f"{source}={backend!r} is unavailable on {device}: {why}")
    if config.backend == "cpp" and method_class(method).routed(params):
        raise ValueError(f"--backend cpp: the {method!r} adapters need route and asym_lora, which have no cpp "
                         "backend; use triton or eager (or leave it automatic)")


def _check_out(directory: str, overwrite: bool, resume: bool) -> None:
    """``--out`` is empty or new, unless ``--overwrite`` or ``--resume`` says to write into it."""
    if overwrite or resume or not os.path.isdir(directory) or not os.listdir(directory):
        return
    entries = sorted(os.listdir(directory))
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ValueError(f"--out {directory} is not empty ({shown}): pass --overwrite to replace the result there, "
                     "--resume to continue its run, or another --out")


def resolved(path: str) -> str:
    """A local path made absolute; anything else (a hub id) as given."""
    return os.path.abspath(path) if os.path.exists(path) else path


def _check_writable(directory: str) -> None:
    """``directory`` exists as a writable folder or can be created; nothing is created yet."""
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {directory}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {directory}: {existing} is not writable")


def _vocabulary_texts(*sets) -> list[str]:
    """Texts to build the tiny model's word-level vocabulary from (a set may mix QA and text rows)."""
    from alter.data import qa_texts
    from alter.methods.data import check_rows

    texts = []
    for data in sets:
        kinds = check_rows(data, "data")
        texts += [row["text"] for row, kind in zip(data, kinds) if kind == "text"]
        qa_rows = [i for i, kind in enumerate(kinds) if kind == "qa"]
        texts += qa_texts(data.select(qa_rows)) if qa_rows else []
    return texts


# --------------------------------------------------------------------------- unlearn


# What a model folder (model.save_pretrained + tokenizer.save_pretrained) holds: (what, any of these files).
MODEL_FOLDER_NEEDS = (
    ("the config", ("config.json",)),
    ("the weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")),
    ("the tokenizer", ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")),
)


def _check_model_folder(path: str) -> None:
    """A local folder holds what a model folder needs; ValueError listing what it lacks."""
    missing = [f"{what} ({' or '.join(files)})" for what, files in MODEL_FOLDER_NEEDS
               if not any(os.path.isfile(os.path.join(path, f)) for f in files)]
    if missing:
        raise ValueError(f"{path} is not a model folder: it lacks {'; '.join(missing)}. A model folder is what "
                         "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR) write (or an alter unlearn "
                         "--out for alter eval)")


def _load_model(path: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alter.data import hub_reachable

    # A hub name with no hub in reach: the local cache only, failing at once instead of
    # after transformers' retries (most of a minute).
    if os.path.isdir(path):
        _check_model_folder(path)
    local_only = not os.path.isdir(path) and not hub_reachable()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only)
    except SafetensorError as exc:  # its message does not say which model
        raise ValueError(f"{path}: the model's weights cannot be read ({exc})") from exc
    return model, tokenizer


def _alter_config(args):
    from alter.config import AlterConfig

    if args.config and args.preset == "paper":
        raise ValueError("--preset paper and --config both give the starting config; pass one")
    try:
        config = AlterConfig.from_json_file(args.config) if args.config else (
            AlterConfig.paper() if args.preset == "paper" else AlterConfig())
    except ValueError as exc:
        raise ValueError(f"--config: {exc}") from exc
    values = config.to_dict()
    values.update(config_overrides(args))
    return AlterConfig.from_dict(values)


def unlearn_args(args):
    """The :class:`~alter.training.args.UnlearnArgs` of the flags, checked."""
    from alter.training.args import UnlearnArgs

    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(UnlearnArgs)}
    values["method_args"] = dict(args.method_args)  # --method-arg KEY=VALUE pairs, the last of a key kept
    return UnlearnArgs(**{**values, "config": _alter_config(args)})


def cmd_unlearn(args) -> int:
    import copy

    from alter.config import read_json
    from alter.files import staged_directory, write_json
    from alter.training.checkpoint import RUN_ARGS_FILE
    from alter.training.loop import unlearn

    # Every check that needs no model first, the arguments before the data; unlearn()
    # checks the rest (the resume checkpoint against this run and data) before its first forward.
    run_args = unlearn_args(args)
    forget = training_records(args.forget, "forget")
    retain = training_records(args.retain, "retain") if args.retain else None
    device = _device(args.device)
    _check_backend(run_args.config, args.method, device, run_args.params)
    _check_writable(args.output_dir)
    _check_out(args.output_dir, args.overwrite, args.resume)
    base = None
    if args.model == TINY:
        from alter.tiny import build_tokenizer, tiny_llama

        tokenizer = build_tokenizer(_vocabulary_texts(*[d for d in (forget, retain) if d is not None]))
        model = tiny_llama(tokenizer)
        base = copy.deepcopy(model)  # saved after the run: nothing is written before unlearn's checks
    else:
        model, tokenizer = _load_model(args.model)
    model.to(device)
    unlearn(model, tokenizer, forget, retain, progress=not args.quiet,
            **{field.name: getattr(run_args, field.name) for field in dataclasses.fields(run_args)})
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # a distributed run's other processes: the main one writes
    if base is not None:
        with staged_directory(os.path.join(args.output_dir, BASE_MODEL_DIR)) as staging:
            base.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    run_file = os.path.join(args.output_dir, RUN_ARGS_FILE)
    run = read_json(run_file)
    # Resolved, so that alter eval finds them from any folder (the tiny base model lives in the output).
    run["base_model"] = BASE_MODEL_DIR if base is not None else resolved(args.model)
    run["forget_file"] = os.path.abspath(args.forget)
    run["retain_file"] = os.path.abspath(args.retain) if args.retain else None
    write_json(run_file, run)
    print(f"unlearned model ({args.method}) written to {args.output_dir} (report: report.md, report.json); "
          f"score it with: alter eval {args.output_dir}")
    return 0


# ------------------------------------------------------------------------------ eval


def cmd_eval(args) -> int:
    from alter.cli_eval import cmd_eval as run_eval  # its module imports this one's readers

    return run_eval(args)


# ------------------------------------------------------------------------- demo/bench


def cmd_demo(args) -> int:
    from alter.demo import run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick, methods=args.methods)
    return 0


def cmd_quality(args) -> int:
    from alter.quality import main as quality_main

    quality_main(args.out, quick=args.quick, seeds=args.seeds, workers=args.workers, development=args.development,
                 scenarios=args.scenarios, ablations=args.ablations, zoo=args.zoo, runs=args.methods)
    return 0


def cmd_bench(argv: list[str]) -> int:
    from alter.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {"demo": cmd_demo, "unlearn": cmd_unlearn, "eval": cmd_eval, "quality": cmd_quality}


def _user_error(exc: BaseException) -> str | None:
    """The one-line message of an error the user can fix, None for a bug."""
    from safetensors import SafetensorError

    from alter_kernels import BackendUnavailable

    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRAS:
        module = exc.name.split(".")[0]
        return f"{module} is not installed: pip install 'alter-kernels[{EXTRAS[module]}]'"
    # OSError: missing files, models transformers cannot load; SafetensorError: a damaged
    # weights file. A message that spans lines is joined.
    if isinstance(exc, (ValueError, TypeError, OSError, BackendUnavailable, SafetensorError)):
        return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        # Everything after "bench" belongs to the harness's own parser (its --help too).
        return cmd_bench(argv[1:])
    # Only the flags of the command given: `alter --help` imports no torch.
    parser = build_parser(argv[0] if argv else "")
    args = parser.parse_args(negative_values_attached(argv))
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise
        parser.exit(2, f"alter {args.command}: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
