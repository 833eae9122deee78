"""The ``alter`` command: ``demo``, ``unlearn``, ``eval`` and ``bench``.

``alter unlearn`` writes into ``--out`` either an adapter (``adapter_config.json`` +
``adapter_model.safetensors``, for the adapter methods) or a full model (for the
full-parameter baselines), the tokenizer, and ``unlearn_args.json`` recording the method
and the base model exactly as ``--model`` gave it. With ``--model tiny`` the base model is
a small random Llama built for the data (for trying the pipeline), saved under
``--out/base_model`` and recorded as ``base_model``, relative to the output directory, so
that the directory can be moved. ``alter eval`` reads such a directory back; a relative
recorded base model is looked for in the output directory first, then as given, and
``--base-model`` overrides it.

Every user error (bad data rows or files, an unavailable backend or device, an unwritable
``--out``, a checkpoint of another run or data, a corrupted adapter) ends the command
with one line on stderr and exit status 2, before the first forward of the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from alter.files import first_line
from alter.methods.args import DEFAULT_EARLY_STOP_SHARE, check_early_stop_share

TINY = "tiny"
BASE_MODEL_DIR = "base_model"


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


def _training_records(path: str, name: str):
    """A forget or retain set, every row checked (:func:`alter.train.check_rows`) first."""
    from alter.train import check_rows

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


def _check_backend(config, method: str, device) -> None:
    """The backend asked for (``--backend`` / the config, or ``ALTER_BACKEND``) runs on ``device``."""
    from alter.train import ADAPTER_METHODS
    from alter_kernels import BACKENDS, available_backends

    for source, backend in (("--backend", config.backend), ("ALTER_BACKEND", os.environ.get("ALTER_BACKEND") or None)):
        if backend is None:
            continue
        if backend not in BACKENDS:
            raise ValueError(f"{source}={backend!r} is not one of {BACKENDS}")
        why = available_backends(device)[backend]
        if why:
            raise ValueError(f"{source}={backend!r} is unavailable on {device}: {why}")
    if config.backend == "cpp" and method in ADAPTER_METHODS:
        raise ValueError(f"--backend cpp: the {method!r} adapters need route and asym_lora, which have no cpp "
                         "backend; use triton or eager (or leave it automatic)")


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
    from alter.train import check_rows

    texts = []
    for data in sets:
        kinds = check_rows(data, "data")
        texts += [row["text"] for row, kind in zip(data, kinds) if kind == "text"]
        qa_rows = [i for i, kind in enumerate(kinds) if kind == "qa"]
        texts += qa_texts(data.select(qa_rows)) if qa_rows else []
    return texts


# --------------------------------------------------------------------------- unlearn


def _load_model(path: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alter.data import _hub_reachable

    # A hub name with no hub in reach: the local cache only, failing at once instead of
    # after transformers' retries (most of a minute).
    local_only = not os.path.isdir(path) and not _hub_reachable()
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
    overrides = {
        "r": args.rank,
        "num_experts": args.num_experts,
        "lr_A": args.lr_a,
        "lr_B": args.lr_b,
        "beta": args.beta,
        "gamma": args.gamma,
        "lam": args.lam,
        "entropy_threshold": args.threshold,
        "tsallis_q": args.q,
        "backend": args.backend,
    }
    values = config.to_dict()
    values.update({k: v for k, v in overrides.items() if v is not None})
    return AlterConfig.from_dict(values)


def cmd_unlearn(args) -> int:
    import copy

    from alter.config import read_json
    from alter.files import staged_directory, write_json
    from alter.train import RUN_ARGS_FILE, unlearn

    # Every check that needs no model first; unlearn() checks the rest (arguments, the
    # resume checkpoint against this run and data) before its first forward.
    forget = _training_records(args.forget, "forget")
    retain = _training_records(args.retain, "retain") if args.retain else None
    config = _alter_config(args)
    device = _device(args.device)
    _check_backend(config, args.method, device)
    _check_writable(args.out)
    base = None
    if args.model == TINY:
        from alter.tiny import build_tokenizer, tiny_llama

        tokenizer = build_tokenizer(_vocabulary_texts(*[d for d in (forget, retain) if d is not None]))
        model = tiny_llama(tokenizer)
        base = copy.deepcopy(model)  # saved after the run: nothing is written before unlearn's checks
    else:
        model, tokenizer = _load_model(args.model)
    model.to(device)
    unlearn(
        model, tokenizer, forget, retain, config, args.method,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
        structural=args.structural, seed=args.seed, output_dir=args.out,
        save_every=args.save_every, resume=args.resume, router_warmup=args.router_warmup,
        router_lr=args.router_lr, early_stop_share=args.early_stop_share, distributed=args.distributed,
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # a distributed run's other processes: the main one writes
    if base is not None:
        with staged_directory(os.path.join(args.out, BASE_MODEL_DIR)) as staging:
            base.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    run_file = os.path.join(args.out, RUN_ARGS_FILE)
    run = read_json(run_file)
    run["base_model"] = BASE_MODEL_DIR if base is not None else args.model  # as given: no absolute path
    write_json(run_file, run)
    print(f"unlearned model ({args.method}) written to {args.out}")
    return 0


# ------------------------------------------------------------------------------ eval


def load_unlearned(path: str, base_model: str | None = None):
    """Model and tokenizer from an ``alter unlearn`` output directory (or any HF model dir).

    An adapter directory is loaded onto its base model: ``base_model`` when given, else
    the one recorded in its ``unlearn_args.json`` (a relative path is looked for in
    ``path`` first, then as given).
    """
    from transformers import AutoTokenizer

    from alter.config import ADAPTER_CONFIG_NAME, read_json
    from alter.model import load_adapter
    from alter.train import RUN_ARGS_FILE

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


def cmd_eval(args) -> int:
    from alter.config import read_json
    from alter.data import PromptFormat
    from alter.eval import evaluate_tofu, open_unlearning_summary
    from alter.files import write_json

    # The inputs that need no model first: a bad one fails before the model is loaded.
    device = _device(args.device)
    retain_ratios, retain_auc = None, None
    if args.retain_metrics:
        retain = read_json(args.retain_metrics)
        retain_ratios, retain_auc = retain.get("forget_truth_ratios"), retain.get("mia_min_k")
        if retain_ratios is None:
            raise ValueError(f"--retain-metrics: {args.retain_metrics} has no 'forget_truth_ratios'")
    style = "chat" if args.chat_template else args.prompt_format
    if args.chat_template and args.prompt_format not in (None, "chat"):
        raise ValueError(f"--chat-template contradicts --prompt-format {args.prompt_format}")
    fmt = PromptFormat(style or "plain", args.system_prompt)
    data = _tofu_data(args.data, args.seed)
    model, tokenizer = load_unlearned(args.model, args.base_model)
    model.to(device)
    reference_model = None
    if args.reference_model:
        reference_model, _ = load_unlearned(args.reference_model)
        reference_model.to(device)
    metrics = evaluate_tofu(model, tokenizer, data, retain_model_truth_ratios=retain_ratios,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompt_format=fmt,
                            num_questions=args.num_questions, retain_model_auc=retain_auc,
                            reference_model=reference_model)
    write_json(args.out, metrics)
    summary_file = args.summary or os.path.join(os.path.dirname(os.path.abspath(args.out)), "TOFU_SUMMARY.json")
    write_json(summary_file, open_unlearning_summary(metrics), indent=4)
    shown = {k: metrics[k] for k in ("forget_quality", "model_utility", "forget_rouge", "retain_rouge")}
    print(json.dumps(shown, indent=2))
    print(f"metrics written to {args.out}; open-unlearning summary to {summary_file}")
    return 0


# ------------------------------------------------------------------------- demo/bench


def cmd_demo(args) -> int:
    from alter.demo import run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick, methods=args.methods)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _share_or_none(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
        check_early_stop_share(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1) or 'none', got {text!r}") from None
    return value


def cmd_quality(args) -> int:
    from alter.quality import main as quality_main

    quality_main(args.out, quick=args.quick, seeds=args.seeds, workers=args.workers, development=args.development)
    return 0


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


def _method_list(text: str) -> tuple[str, ...]:
    from alter.train import METHODS

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {','.join(METHODS)}")
    return methods


def cmd_bench(argv: list[str]) -> int:
    try:
        from alter.bench import main as bench_main
    except ImportError as exc:
        print(f"alter bench is not available in this installation ({exc})", file=sys.stderr)
        return 2
    return bench_main(argv) or 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from alter.data import PROMPT_FORMATS
    from alter.methods.args import DISTRIBUTED_MODES
    from alter.train import METHODS, STRUCTURAL_MODES

    parser = argparse.ArgumentParser(prog="alter", description="ALTER: token-entropy-guided unlearning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,unlearn,eval,quality,bench}")

    demo = sub.add_parser("demo", help="the whole pipeline on tofu_mini with a tiny model (CPU, minutes)",
                          description="Build tofu_mini and a tiny Llama, memorize the facts, unlearn the forget "
                                      "split with ALTER and every baseline, evaluate, and write a table and a plot.")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="smaller data and fewer steps (a smoke run)")
    demo.add_argument("--methods", type=_method_list, default=METHODS, metavar="M1,M2",
                      help=f"comma-separated unlearning methods to run (default: all of {','.join(METHODS)})")
    demo.set_defaults(func=cmd_demo)

    un = sub.add_parser("unlearn", help="unlearn a forget set from a model",
                        description="Unlearn the forget set from a model while keeping the retain set. Data files "
                                    "are JSON or JSON lines with question/answer fields (QA) or a text field.")
    un.add_argument("--model", required=True, help=f"Hugging Face model directory or name, or '{TINY}' for a small random Llama")
    un.add_argument("--forget", required=True, help="forget set (json/jsonl)")
    un.add_argument("--retain", help="retain set (json/jsonl); required except for grad_ascent and npo")
    un.add_argument("--method", choices=METHODS, default="alter")
    un.add_argument("--out", required=True, help="output directory")
    un.add_argument("--config", help="AlterConfig JSON file (adapter_config.json layout); flags below override it")
    un.add_argument("--preset", choices=("default", "paper"), default="default",
                    help="starting config instead of --config: the library's defaults or the paper's settings "
                         "(AlterConfig.paper(): lr_A 1e-5, lr_B 1e-3, A from high-entropy tokens, forced routes)")
    un.add_argument("--epochs", type=int, help="passes over the forget set (default: sized from the data)")
    un.add_argument("--batch-size", type=int, default=4)
    un.add_argument("--max-steps", type=int)
    un.add_argument("--lr", type=float, default=1e-5, help="learning rate of the full-parameter baselines")
    un.add_argument("--lr-a", type=float, help="learning rate of A (default 1e-3)")
    un.add_argument("--lr-b", type=float, help="learning rate of the B experts (default 3e-3)")
    un.add_argument("--router-lr", type=float, help="learning rate of the routers (default: --lr-b)")
    un.add_argument("--early-stop-share", type=_share_or_none, default=DEFAULT_EARLY_STOP_SHARE,
                    help="stop once at most this share of the forget tokens predicted at the start is still "
                         f"predicted, checked after each pass over the forget set (default {DEFAULT_EARLY_STOP_SHARE}; "
                         "'none': run every step)")
    un.add_argument("--beta", type=float, help="forget loss weight")
    un.add_argument("--gamma", type=float, help="retain loss weight")
    un.add_argument("--lam", type=float, help="structural term weight")
    un.add_argument("--rank", type=int, help="LoRA rank r")
    un.add_argument("--num-experts", type=int, help="B experts N (retention + N-1 forget experts)")
    un.add_argument("--threshold", type=float, help="entropy threshold of high-entropy tokens")
    un.add_argument("--q", type=float, help="Tsallis q")
    un.add_argument("--backend", choices=("eager", "triton", "cpp"), help="op backend (default: automatic)")
    un.add_argument("--structural", choices=STRUCTURAL_MODES, default="surrogate",
                    help="structural term: cheap surrogate (default) or exact double backward (small models)")
    un.add_argument("--router-warmup", type=int,
                    help="router-only steps before unlearning (default: sized from the data)")
    un.add_argument("--seed", type=int, default=0)
    un.add_argument("--save-every", type=int, help="checkpoint every N steps")
    un.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    un.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    un.add_argument("--distributed", choices=DISTRIBUTED_MODES,
                    help="under torchrun: data-parallel (ddp) or sharded (fsdp2) through accelerate; "
                         "--batch-size is the global batch (under accelerate launch its config decides)")
    un.add_argument("--quiet", action="store_true", help="no progress bar")
    un.set_defaults(func=cmd_unlearn)

    ev = sub.add_parser("eval", help="TOFU metrics of a model or adapter directory",
                        description="Evaluate a model (or an alter unlearn output directory) on TOFU-format data "
                                    "and write the metrics as JSON.")
    ev.add_argument("--model", required=True, help="model directory or alter unlearn output directory")
    ev.add_argument("--base-model", help="base model of an adapter directory (default: the one it records)")
    ev.add_argument("--data", default="tofu_mini",
                    help="'tofu_mini' (default) or a folder of TOFU-schema files forget/retain/real_authors/"
                         "world_facts .json or .jsonl (question, answer, paraphrased_answer, perturbed_answer), "
                         "and holdout (question, answer) for membership inference")
    ev.add_argument("--retain-metrics", help="metrics JSON of a retain model (from alter eval): gives forget quality "
                                             "and, with a holdout split, privleak")
    ev.add_argument("--seed", type=int, default=0, help="seed of tofu_mini")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", required=True, help="metrics JSON file to write")
    ev.add_argument("--summary", help="also the metrics in open-unlearning's summary layout, written here "
                                      "(default: TOFU_SUMMARY.json beside --out)")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=200,
                    help="greedy answer length for ROUGE (default: 200, as TOFU and open-unlearning)")
    ev.add_argument("--prompt-format", choices=PROMPT_FORMATS,
                    help="how questions are prompted: 'plain' (default; 'Question: ...\\nAnswer:', as alter unlearn "
                         "trains), 'llama2-inst' ('[INST] ... [/INST]', TOFU's Llama-2) or 'chat' (the tokenizer's "
                         "chat template, open-unlearning's instruct models)")
    ev.add_argument("--chat-template", action="store_true", help="same as --prompt-format chat")
    ev.add_argument("--system-prompt", help="system turn of the chat template (open-unlearning's Llama-3 models: "
                                            "'You are a helpful assistant.')")
    ev.add_argument("--num-questions", type=_positive_int,
                    help="evaluate the first N questions of each split (TOFU's ds_size: 300; default: all)")
    ev.add_argument("--batch-size", type=_positive_int, default=16, help="evaluation batch size (default: 16)")
    ev.add_argument("--reference-model", help="model directory for the reference membership-inference attack "
                                              "(e.g. the retain model): adds mia_reference")
    ev.set_defaults(func=cmd_eval)

    quality = sub.add_parser("quality", help="unlearning quality of the default call on held-out scenarios",
                             description="Memorize fictitious-knowledge scenarios with tiny models, unlearn with "
                                         "the default call of every method and ALTER's ablations, and write "
                                         "QUALITY.md, QUALITY.json and quality_tradeoff.png.")
    quality.add_argument("--out", default="benchmarks", help="output directory (default: benchmarks)")
    quality.add_argument("--quick", action="store_true",
                         help="one scenario, one seed, 3 steps per run: checks that the suite runs (CI)")
    quality.add_argument("--seeds", type=_seed_list, help="comma-separated seeds (default: the held-out seeds)")
    quality.add_argument("--workers", type=_positive_int, default=2, help="processes, one thread each (default 2)")
    quality.add_argument("--development", action="store_true",
                         help="the development scenarios and seeds (the ones the defaults were tuned on)")
    quality.set_defaults(func=cmd_quality)

    bench = sub.add_parser("bench", help="kernel and training-step benchmarks (see alter bench --help)", add_help=False)
    bench.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        # Everything after "bench" belongs to alter.bench's own parser (its --help too).
        return cmd_bench(argv[1:])
    from safetensors import SafetensorError

    from alter_kernels import BackendUnavailable

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    # OSError: missing files, models transformers cannot load; SafetensorError: a damaged
    # weights file. One line: a message that spans lines is joined.
    except (ValueError, TypeError, OSError, BackendUnavailable, SafetensorError) as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        parser.exit(2, f"alter {args.command}: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
