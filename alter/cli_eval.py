"""``alter eval``: a model, or an ``alter unlearn`` output directory, scored on the user's
own forget/retain files (those given, else those the run recorded) with
:func:`alter.evaluation.evaluate_own_data`, or on TOFU-format data (``--data``) with
:func:`alter.evaluation.evaluate_tofu`. Results are written beside earlier ones, never over
them (:func:`fresh_path`)."""
from __future__ import annotations

import os

from alter.cli import _check_model_folder, _device, _load_model, read_records, training_records
from alter.files import first_line


def load_unlearned(path: str, base_model: str | None = None):
    """Model and tokenizer from an ``alter unlearn`` output directory (or any HF model dir).

    An adapter directory is loaded onto its base model: ``base_model`` when given, else
    the one recorded in its ``unlearn_args.json`` (a relative path is looked for in
    ``path`` first, then as given).
    """
    from transformers import AutoTokenizer

    from alter.config import ADAPTER_CONFIG_NAME, read_json
    from alter.adapters import load_adapter
    from alter.training.checkpoint import RUN_ARGS_FILE

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model: no such directory: {path}")
    if not os.path.exists(os.path.join(path, ADAPTER_CONFIG_NAME)):
        return _load_model(path)
    source = "--base-model"
    if base_model is None:
        run_file = os.path.join(path, RUN_ARGS_FILE)
        base_model = read_json(run_file).get("base_model") if os.path.exists(run_file) else None
        if base_model is None:
            raise ValueError(f"{path} holds an adapter but no {RUN_ARGS_FILE} naming its base model: pass --base-model")
        source = f"recorded in {run_file}"
        if not os.path.isabs(base_model) and os.path.isdir(os.path.join(path, base_model)):
            base_model = os.path.join(path, base_model)
    if os.path.isabs(base_model) and not os.path.isdir(base_model):
        raise FileNotFoundError(f"the base model {base_model} ({source}) is not a directory: pass --base-model PATH")
    try:
        model, _ = _load_model(base_model)
    except OSError as exc:
        raise OSError(f"cannot load the base model {base_model!r} ({source}): {first_line(exc)}; "
                      "pass --base-model PATH") from exc
    load_adapter(model, path)
    return model, AutoTokenizer.from_pretrained(path)


def _tofu_data(spec: str, seed: int):
    """``tofu_mini`` or a folder of TOFU-schema files ``{split}.json``/``.jsonl``."""
    import datasets

    from alter.data import tofu_mini

    if spec == "tofu_mini":
        return tofu_mini(seed=seed)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--data: no such directory: {spec} (or use 'tofu_mini')")
    splits = {}
    for name in ("forget", "retain", "real_authors", "world_facts", "holdout"):
        for ext in (".jsonl", ".json"):
            if os.path.exists(os.path.join(spec, name + ext)):
                splits[name] = read_records(os.path.join(spec, name + ext))
                break
    return datasets.DatasetDict(splits)


def fresh_path(path: str) -> str:
    """``path`` when nothing is there, else the first free ``stem-2.ext``, ``stem-3.ext``, ...
    beside it: earlier results are never written over."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}{ext}"
    return path


def _own_data(args, model_dir: str) -> dict:
    """{split: (file, dataset)} of the user's data: the flags', else what the run recorded."""
    from alter.config import read_json
    from alter.training.checkpoint import RUN_ARGS_FILE

    run_file = os.path.join(model_dir, RUN_ARGS_FILE)
    recorded = read_json(run_file) if os.path.isfile(run_file) else {}
    files = {"forget": args.forget or recorded.get("forget_file"),
             "retain": args.retain or (None if args.forget else recorded.get("retain_file")),
             "holdout": args.holdout}
    if files["forget"] is None:
        where = f"{run_file} records none" if recorded else f"{model_dir} has no {RUN_ARGS_FILE}"
        raise ValueError(f"no data to score ({where}): pass --forget FILE (and --retain FILE), the files you "
                         "unlearned, or --data tofu_mini for the built-in TOFU sample")
    for name, file in files.items():
        if file is not None and not os.path.isfile(file):
            source = f"--{name}" if getattr(args, name) else f"recorded in {run_file}"
            raise FileNotFoundError(f"no such {name} file: {file} ({source}); pass --{name} FILE")
    return {name: (file, training_records(file, name)) for name, file in files.items() if file is not None}


def _print_metrics(metrics: dict, glossary: dict) -> None:
    """The headline numbers, one per line, then a line for each term shown."""
    for key, value in metrics.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) or value is None:
            shown = "-" if value is None else value if isinstance(value, str) else format(value, ".4g")
            print(f"  {key:<28} {shown}")
    if glossary:
        print("glossary:")
        for term, meaning in glossary.items():
            print(f"  {term}: {meaning}")


def _eval_tofu(args, model, tokenizer, device, fmt, out_file: str) -> None:
    """``--data``: the TOFU evaluation, its metrics and open-unlearning's summary written beside earlier ones."""
    from alter.config import read_json
    from alter.evaluation import evaluate_tofu, open_unlearning_summary
    from alter.files import write_json

    retain_ratios, retain_auc = None, None
    if args.retain_metrics:
        retain = read_json(args.retain_metrics)
        retain_ratios, retain_auc = retain.get("forget_truth_ratios"), retain.get("mia_min_k")
        if retain_ratios is None:
            raise ValueError(f"--retain-metrics: {args.retain_metrics} has no 'forget_truth_ratios'")
    data = _tofu_data(args.data, args.seed)
    reference_model = None
    if args.reference_model:
        reference_model, _ = load_unlearned(args.reference_model)
        reference_model.to(device)
    metrics = evaluate_tofu(model, tokenizer, data, retain_model_truth_ratios=retain_ratios,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompt_format=fmt,
                            num_questions=args.num_questions, retain_model_auc=retain_auc,
                            reference_model=reference_model)
    write_json(out_file, metrics)
    summary_file = fresh_path(args.summary or os.path.join(os.path.dirname(out_file), "TOFU_SUMMARY.json"))
    write_json(summary_file, open_unlearning_summary(metrics), indent=4)
    print(f"alter eval on {args.data}:")
    _print_metrics({k: metrics[k] for k in ("forget_quality", "model_utility", "forget_rouge", "retain_rouge")}, {})
    print(f"metrics written to {out_file}; open-unlearning summary to {summary_file}")


def cmd_eval(args) -> int:
    from alter.config import read_json
    from alter.data import PromptFormat
    from alter.evaluation import evaluate_own_data
    from alter.files import write_json
    from alter.training.checkpoint import RUN_ARGS_FILE

    if args.path and args.model and os.path.abspath(args.path) != os.path.abspath(args.model):
        raise ValueError(f"two models given: {args.path} and --model {args.model}; pass one")
    model_dir = args.path or args.model
    if model_dir is None:
        raise ValueError("no model given: alter eval OUT (an alter unlearn output or a model directory)")
    from alter.config import ADAPTER_CONFIG_NAME

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"no such model directory: {model_dir}")
    if not os.path.exists(os.path.join(model_dir, ADAPTER_CONFIG_NAME)):
        _check_model_folder(model_dir)  # before the data: the model is what was given first
    if args.data and (args.forget or args.retain or args.holdout):
        raise ValueError("--data (TOFU data) and --forget/--retain/--holdout (your data) exclude each other; pass one")
    # The inputs that need no model first: a bad one fails before the model is loaded.
    device = _device(args.device)
    style = "chat" if args.chat_template else args.prompt_format
    if args.chat_template and args.prompt_format not in (None, "chat"):
        raise ValueError(f"--chat-template contradicts --prompt-format {args.prompt_format}")
    fmt = PromptFormat(style or "plain", args.system_prompt)
    own = None if args.data else _own_data(args, model_dir)
    retain_ratios = None
    if own is not None and args.retain_metrics:
        retain_ratios = read_json(args.retain_metrics).get("forget_truth_ratios")
        if retain_ratios is None:
            raise ValueError(f"--retain-metrics: {args.retain_metrics} has no 'forget_truth_ratios'")
    is_run = os.path.isfile(os.path.join(model_dir, RUN_ARGS_FILE))
    out_file = fresh_path(os.path.abspath(args.out or (os.path.join(model_dir, "eval.json") if is_run
                                                       else "eval.json")))
    model, tokenizer = load_unlearned(model_dir, args.base_model)
    model.to(device)
    if own is None:
        _eval_tofu(args, model, tokenizer, device, fmt, out_file)
        return 0
    data = {name: dataset for name, (_, dataset) in own.items()}
    if args.num_questions:
        data = {name: d.select(range(min(args.num_questions, len(d)))) for name, d in data.items()}
    metrics = evaluate_own_data(model, tokenizer, data["forget"], data.get("retain"), data.get("holdout"),
                                retain_model_truth_ratios=retain_ratios, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, prompt_format=fmt, progress=not args.quiet)
    glossary = metrics.pop("glossary")
    record = {"model": os.path.abspath(model_dir), "data": {name: file for name, (file, _) in own.items()},
              **metrics, "glossary": glossary}
    write_json(out_file, record)
    print(f"alter eval {model_dir} on " + ", ".join(f"{name} {file} ({len(data[name])} rows)"
                                                    for name, (file, _) in own.items()) + ":")
    _print_metrics(metrics, glossary)
    print(f"metrics written to {out_file}")
    return 0
