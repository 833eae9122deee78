"""The argument parser of the ``alter`` command.

``alter unlearn``'s run flags are generated from the fields of
:class:`~alter.training.args.UnlearnArgs`: each field is a flag (``max_length`` is
``--max-length``) with the field's type, its ``metadata["help"]`` and its default; a bool
field is ``--flag`` / ``--no-flag``; a field that may be None takes ``none`` too. The field
``config`` is built from the config flags (``--config``, ``--preset``, ``--rank``, ...).

A subcommand's flags are added only when that subcommand is parsed, and the modules they
need (torch, transformers, datasets) are imported only then: ``alter --help`` imports none.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing

TINY = "tiny"

# Flags of UnlearnArgs fields spelled otherwise than --field-name (the first is shown).
FIELD_FLAGS = {"output_dir": ("--out", "--output-dir")}
# AlterConfig fields settable by a flag of alter unlearn: flag -> (field, type, help).
CONFIG_FLAGS = {
    "--rank": ("r", int, "LoRA rank r"),
    "--num-experts": ("num_experts", int, "B experts N (retention + N-1 forget experts)"),
    "--lr-a": ("lr_A", float, "learning rate of A"),
    "--lr-b": ("lr_B", float, "learning rate of the B experts"),
    "--beta": ("beta", float, "forget loss weight of alter and asym_lora"),
    "--gamma": ("gamma", float, "retain loss weight of alter and asym_lora"),
    "--lam": ("lam", float, "structural term weight"),
    "--threshold": ("entropy_threshold", float, "entropy threshold of high-entropy tokens"),
    "--q": ("tsallis_q", float, "Tsallis q"),
    "--backend": ("backend", str, "op backend (default: automatic)"),
    "--routing": ("routing", str, "token: the per-token routers; sequence: a forget expert from the first of the "
                                  "forget rows' keys on (docs/routing.md)"),
    "--forget-tokens": ("forget_tokens", str, "unpredictable: push down the forget tokens the retain rows do not "
                                              "predict and keep the others; all: every forget token"),
    "--forget-floor": ("forget_floor", bool, "aim each forget token at the retain rows' n-gram log-probability "
                                             "of it: push it down to there, hold a kept one up to there (not "
                                             "given: on under --forget-tokens unpredictable; docs/training.md)"),
    "--template-tokens": ("template_tokens", bool, "keep the forget rows' template words (those the most similar "
                                                   "retain rows hold at the same place) out of the forget loss: "
                                                   "fluent wrong answers, lower forget quality (default: off; "
                                                   "docs/training.md)"),
}
CONFIG_DEST = "config_{}"  # namespace attribute of a config flag's field
# A negative number in any notation Python reads: argparse takes '-1e-3' for an option.
_NEGATIVE_NUMBER = re.compile(r"-(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|-inf(?:inity)?|-nan", re.IGNORECASE)


def negative_values_attached(argv: list[str]) -> list[str]:
    """``argv`` with each negative number that follows a ``--flag`` joined to it
    (``--lr-b -1e-3`` -> ``--lr-b=-1e-3``), so that it reaches the flag's checks."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _NEGATIVE_NUMBER.fullmatch(token):
            joined[-1] += "=" + token
        else:
            joined.append(token)
    return joined


# ----------------------------------------------------------------------------- values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _share_or_none(text: str) -> float | str | None:
    from alter.training.args import check_early_stop_share

    word = text.strip().lower()
    if word in ("none", "auto"):
        return None if word == "none" else "auto"
    try:
        value = float(text)
        check_early_stop_share(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), 'auto' or 'none', got {text!r}") from None
    return value


def _or_none(kind: type):
    """The value parser of a field of type ``kind | None``: ``none`` is None."""
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = f"{kind.__name__} or none"  # argparse's "invalid ... value" names it
    return parse


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


def _scenario_list(text: str) -> tuple:
    from alter.data.scenarios import DEVELOPMENT, HELD_OUT

    known = {s.name: s for s in DEVELOPMENT + HELD_OUT}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenarios {unknown or text!r}; known: {', '.join(known)}")
    return tuple(known[n] for n in names)


def scenario_pairs_parser(description: str) -> argparse.ArgumentParser:
    """The parser of a study over (scenario, seed) pairs (``benchmarks/key_coverage.py``,
    ``benchmarks/relearn_paths.py``): ``--scenarios`` as ``alter quality`` takes them and
    ``--seeds``, by default the development seeds 0, 1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--scenarios", required=True, type=_scenario_list,
                        help="comma-separated scenario names, development or held out")
    parser.add_argument("--seeds", default=(0, 1), type=_seed_list, help="comma-separated (default: 0,1)")
    return parser


def _method_list(text: str) -> tuple[str, ...]:
    from alter.methods import parse_run

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods:
        raise argparse.ArgumentTypeError(f"no method in {text!r}")
    for name in methods:
        try:
            parse_run(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return methods


def _quality_runs(text: str) -> tuple[str, ...]:
    """Runs of ``alter quality --methods``: what ``--methods`` of the demo takes, or ALTER's ablations."""
    from alter.quality import ABLATIONS

    runs = tuple(m.strip() for m in text.split(",") if m.strip())
    others = [m for m in runs if m not in ABLATIONS]
    if others or not runs:
        _method_list(",".join(others))  # refuses an unknown name (or none), with the reason
    return runs


def method_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--method-arg``: the value read as JSON (``0.2``, ``true``, ``"x"``),
    else as the string given (``retain_loss_type=NLL``)."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


# Value parsers of UnlearnArgs fields checked while parsing.
FIELD_PARSERS = {"early_stop_share": _share_or_none}


# --------------------------------------------------------------------------- unlearn


def _scalar_type(hint) -> tuple[type, bool]:
    """(bool, int, float or str; whether None is allowed) of a field's annotation."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (bool, int, float, str):
        raise TypeError(f"no flag for a field of type {hint}: give it one in alter.cli_parser")
    return kinds[0], len(kinds) < len(args)


def add_field_flag(group, field: dataclasses.Field, hint, choices=None):
    """The flag of one UnlearnArgs field (dest: the field's name)."""
    kind, optional = (None, True) if field.name in FIELD_PARSERS else _scalar_type(hint)
    flags = FIELD_FLAGS.get(field.name, ("--" + field.name.replace("_", "-"),))
    kwargs = dict(dest=field.name, default=field.default)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        choices = choices or field.metadata.get("choices")
        kwargs["type"] = FIELD_PARSERS.get(field.name) or (_or_none(kind) if optional and not choices else kind)
        kwargs["choices"] = choices
    if field.name == "output_dir":
        kwargs["required"] = True
    action = group.add_argument(*flags, **kwargs)
    action.help = field.metadata["help"] + ("" if action.required else " (default: %(default)s)")
    return action


def add_unlearn_flags(un: argparse.ArgumentParser) -> None:
    from alter.config import BACKEND_CHOICES, FORGET_TOKENS, ROUTINGS, AlterConfig
    from alter.methods import METHODS
    from alter.training.args import UnlearnArgs

    un.add_argument("--model", required=True, help=f"Hugging Face model directory or name, or '{TINY}' for a small "
                                                   "random Llama")
    un.add_argument("--forget", required=True, help="forget set (json/jsonl)")
    un.add_argument("--retain", help="retain set (json/jsonl); required except for the methods that read none "
                                     "(grad_ascent, undial, ceu) on --params full (default: none)")
    un.add_argument("--overwrite", action="store_true",
                    help="replace what a non-empty --out holds (default: off: a non-empty --out is refused, "
                         "unless --resume continues the run there)")
    run = un.add_argument_group("run", "the arguments of alter.unlearn (alter.training.args.UnlearnArgs); "
                                       "'none' gives None")
    hints = typing.get_type_hints(UnlearnArgs)
    for field in dataclasses.fields(UnlearnArgs):
        if field.name not in ("config", "method_args"):  # built from the config flags / --method-arg
            add_field_flag(run, field, hints[field.name], choices=METHODS if field.name == "method" else None)
    run.add_argument("--method-arg", dest="method_args", type=method_arg, action="append", default=[],
                     metavar="KEY=VALUE", help="a hyper-parameter of the method over its default (open-unlearning's "
                                               "names, e.g. beta=0.2; repeatable)")

    config = un.add_argument_group("config", "the AlterConfig of the adapter methods")
    config.add_argument("--config", help="AlterConfig JSON file (adapter_config.json layout); flags below override "
                                         "it (default: none)")
    config.add_argument("--preset", choices=("default", "paper"), default="default",
                        help="starting config instead of --config: the library's defaults or the paper's settings "
                             "(AlterConfig.paper(): lr_A 1e-5, lr_B 1e-3, A from high-entropy tokens, forced routes) "
                             "(default: %(default)s)")
    defaults = AlterConfig()
    for flag, (name, kind, text) in CONFIG_FLAGS.items():
        choices = {"backend": [b for b in BACKEND_CHOICES if b is not None], "routing": ROUTINGS,
                   "forget_tokens": FORGET_TOKENS}.get(name)
        shown = "" if name == "backend" else f" (default: {getattr(defaults, name)}, or --config/--preset's)"
        if kind is bool:  # --flag / --no-flag; None (not given) leaves the config's value
            config.add_argument(flag, dest=CONFIG_DEST.format(name), action=argparse.BooleanOptionalAction,
                                default=None, help=text + shown)
        else:
            config.add_argument(flag, dest=CONFIG_DEST.format(name), type=kind, choices=choices, help=text + shown)

    un.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    un.add_argument("--quiet", action="store_true", help="no progress bars and no report on the terminal "
                                                          "(default: off; the report is saved in --out either way)")


def config_overrides(args: argparse.Namespace) -> dict:
    """The AlterConfig fields given by config flags: {field: value}."""
    values = {name: getattr(args, CONFIG_DEST.format(name)) for name, _, _ in CONFIG_FLAGS.values()}
    return {name: value for name, value in values.items() if value is not None}


# ----------------------------------------------------------------------- other commands


def add_demo_flags(demo: argparse.ArgumentParser) -> None:
    from alter.methods import DEMO_METHODS, METHODS

    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--seed", type=int, default=None,
                      help="run this one seed (default: seeds 0-4, two processes, reporting mean ± std)")
    demo.add_argument("--quick", action="store_true", help="smaller data and fewer steps (a smoke run; default: off)")
    demo.add_argument("--methods", type=_method_list, default=DEMO_METHODS, metavar="M1,M2",
                      help=f"comma-separated unlearning methods to run, any of {','.join(METHODS)}, each "
                           "on its default params or as METHOD@PARAMS (e.g. simnpo@lora) "
                           f"(default: {','.join(DEMO_METHODS)})")


def add_eval_flags(ev: argparse.ArgumentParser) -> None:
    from alter.data import PROMPT_FORMATS

    ev.add_argument("path", nargs="?", metavar="OUT",
                    help="an alter unlearn output directory or any model directory (or give it as --model)")
    ev.add_argument("--model", help="the same as OUT (default: OUT)")
    ev.add_argument("--base-model", help="base model of an adapter directory (default: the one it records)")
    own = ev.add_argument_group("your data", "the files alter unlearn takes (json/jsonl, QA or text rows); "
                                             "without them and without --data, the ones OUT/unlearn_args.json records")
    own.add_argument("--forget", help="forget set (default: the one OUT was unlearned with)")
    own.add_argument("--retain", help="retain set (default: the one OUT was unlearned with, if any)")
    own.add_argument("--holdout", help="rows the model never saw, for membership inference against the forget set "
                                       "(default: none; the attacks then compare forget with retain)")
    ev.add_argument("--data", help="TOFU-format data instead of your own: 'tofu_mini' (the built-in fictitious "
                                   "authors) or a folder of TOFU-schema files forget/retain/real_authors/"
                                   "world_facts .json or .jsonl (question, answer, paraphrased_answer, "
                                   "perturbed_answer) and holdout (question, answer) (default: none: your data)")
    ev.add_argument("--retain-metrics", help="metrics JSON of a retain model (from alter eval): gives forget quality "
                                             "and, with a holdout split, privleak (default: none)")
    ev.add_argument("--seed", type=int, default=0, help="seed of tofu_mini (default: 0)")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", help="metrics JSON file; an existing file is kept and the metrics go beside it under "
                                  "a new name (default: OUT/eval.json, or eval.json here for a model directory)")
    ev.add_argument("--summary", help="TOFU data only: the metrics in open-unlearning's summary layout, written here, "
                                      "beside an existing file (default: TOFU_SUMMARY.json beside --out)")
    ev.add_argument("--max-new-tokens", type=positive_int, default=200,
                    help="greedy answer length for ROUGE (default: 200, as TOFU and open-unlearning)")
    ev.add_argument("--prompt-format", choices=PROMPT_FORMATS,
                    help="how questions are prompted: 'plain' ('Question: ...\\nAnswer:', as alter unlearn "
                         "trains), 'llama2-inst' ('[INST] ... [/INST]', TOFU's Llama-2) or 'chat' (the tokenizer's "
                         "chat template, open-unlearning's instruct models) (default: plain)")
    ev.add_argument("--chat-template", action="store_true", help="same as --prompt-format chat (default: off)")
    ev.add_argument("--system-prompt", help="system turn of the chat template (open-unlearning's Llama-3 models: "
                                            "'You are a helpful assistant.') (default: none)")
    ev.add_argument("--num-questions", type=positive_int,
                    help="evaluate the first N questions of each split (TOFU's ds_size: 300; default: all)")
    ev.add_argument("--batch-size", type=positive_int, default=16, help="evaluation batch size (default: 16)")
    ev.add_argument("--reference-model", help="TOFU data only: model directory for the reference membership-"
                                              "inference attack (e.g. the retain model): adds mia_reference "
                                              "(default: none)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")


def add_quality_flags(quality: argparse.ArgumentParser) -> None:
    quality.add_argument("--out", default="benchmarks", help="output directory (default: benchmarks)")
    quality.add_argument("--quick", action="store_true",
                         help="one scenario, one seed, 3 steps per run: checks that the suite runs (CI) (default: off)")
    quality.add_argument("--seeds", type=_seed_list, help="comma-separated seeds (default: the held-out seeds)")
    quality.add_argument("--workers", type=positive_int, default=2, help="processes, one thread each (default: 2)")
    quality.add_argument("--development", action="store_true",
                         help="the development scenarios and seeds, the ones the defaults were tuned on "
                              "(default: off: the held-out ones)")
    quality.add_argument("--ablations", action="store_true",
                         help="also run ALTER with one component off or replaced (alter.quality.ABLATIONS); default: methods only")
    quality.add_argument("--zoo", action="store_true",
                         help="also run every method on its other parameterizations, as method@params "
                              "(alter.quality.ZOO_RUNS); default: each method on its default params only")
    quality.add_argument("--scenarios", type=_scenario_list,
                         help="comma-separated scenario names, development or held out (default: the held-out "
                              "ones, or the development ones with --development)")
    quality.add_argument("--methods", type=_quality_runs,
                         help="comma-separated runs instead of every method: methods, method@params or ALTER's "
                              "ablations (default: every method)")


# name: (help, description, flags); bench's flags are the harness's own (benchmarks/harness.py).
SUBCOMMANDS = {
    "demo": ("the whole pipeline on tofu_mini with a tiny model (CPU, minutes)",
             "Build tofu_mini and a tiny Llama, memorize the facts, unlearn the forget split with ALTER and every "
             "baseline, evaluate, and write a table and a plot.", add_demo_flags),
    "unlearn": ("unlearn a forget set from a model",
                "Unlearn the forget set from a model while keeping the retain set. Data files are JSON or JSON lines "
                "with question/answer fields (QA) or a text field.", add_unlearn_flags),
    "eval": ("score a model or alter unlearn output on your forget/retain data (or TOFU data)",
             "Evaluate a model (or an alter unlearn output directory) on your own forget/retain files (by default "
             "the ones the run recorded), or on TOFU-format data with --data, and write the metrics as JSON.",
             add_eval_flags),
    "quality": ("unlearning quality of the default call on held-out scenarios",
                "Memorize fictitious-knowledge scenarios with tiny models (the target, and the oracle that never saw "
                "the forget rows), unlearn with the default call of every method (and ALTER's ablations with "
                "--ablations), score against the oracle, and write QUALITY.md, QUALITY.json and quality_tradeoff.png.",
                add_quality_flags),
    "bench": ("kernel and training-step benchmarks, from a source checkout (see alter bench --help)", None, None),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``alter``: with ``command``, only that subcommand's flags are added
    (``""``: none, enough for ``alter --help``); with None, every subcommand's."""
    parser = argparse.ArgumentParser(prog="alter", description="ALTER: token-entropy-guided unlearning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (help, description, add_flags) in SUBCOMMANDS.items():
        subparser = sub.add_parser(name, help=help, description=description, add_help=add_flags is not None)
        if add_flags is not None and command in (None, name):
            add_flags(subparser)
    return parser
