"""The ``alter`` command: ``demo``, ``unlearn``, ``eval`` and ``bench``.

``alter unlearn`` writes into ``--out`` either an adapter (``adapter_config.json`` +
``adapter_model.safetensors``, for the adapter methods) or a full model (for the
full-parameter baselines), the tokenizer, and ``unlearn_args.json`` recording the method
and where the base model is. With ``--model tiny`` the base model is a small random Llama
built for the data (for trying the pipeline), saved under ``--out/base_model``.
``alter eval`` reads such a directory back.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

TINY = "tiny"
BASE_MODEL_DIR = "base_model"


def read_records(path: str):
    """A ``datasets.Dataset`` from a JSON-lines file or a JSON file holding a list of rows."""
    import datasets

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
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: every row must be a JSON object")
    return datasets.Dataset.from_list(rows)


def _vocabulary_texts(*sets) -> list[str]:
    """Texts to build the tiny model's word-level vocabulary from."""
    from alter.data import qa_texts

    texts = []
    for data in sets:
        texts += data["text"] if "text" in data.column_names else qa_texts(data)
    return texts


# --------------------------------------------------------------------------- unlearn


def _load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alter.data import _hub_reachable

    # A hub name with no hub in reach: the local cache only, failing at once instead of
    # after transformers' retries (most of a minute).
    local_only = not os.path.isdir(path) and not _hub_reachable()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only)
    return model, tokenizer


def _alter_config(args):
    from alter.config import AlterConfig

    config = AlterConfig.from_json_file(args.config) if args.config else AlterConfig()
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
    import torch

    from alter.config import read_json
    from alter.train import RUN_ARGS_FILE, check_dataset, unlearn

    forget = read_records(args.forget)
    check_dataset(forget, "forget")
    retain = read_records(args.retain) if args.retain else None
    if retain is not None:
        check_dataset(retain, "retain")
    if args.model == TINY:
        from alter.tiny import build_tokenizer, tiny_llama

        tokenizer = build_tokenizer(_vocabulary_texts(*[d for d in (forget, retain) if d is not None]))
        model = tiny_llama(tokenizer)
        base_model = os.path.join(os.path.abspath(args.out), BASE_MODEL_DIR)
        model.save_pretrained(base_model)
        tokenizer.save_pretrained(base_model)
    else:
        model, tokenizer = _load_model(args.model)
        base_model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    unlearn(
        model, tokenizer, forget, retain, _alter_config(args), args.method,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
        structural=args.structural, seed=args.seed, output_dir=args.out,
        save_every=args.save_every, resume=args.resume, router_warmup=args.router_warmup,
        router_lr=args.router_lr, progress=not args.quiet,
    )
    run_file = os.path.join(args.out, RUN_ARGS_FILE)
    run = read_json(run_file)
    run["base_model"] = base_model
    with open(run_file, "w") as f:
        json.dump(run, f, indent=2)
    print(f"unlearned model ({args.method}) written to {args.out}")
    return 0


# ------------------------------------------------------------------------------ eval


def load_unlearned(path: str, base_model: str | None = None):
    """Model and tokenizer from an ``alter unlearn`` output directory (or any HF model dir).

    An adapter directory is loaded onto its base model: ``base_model`` when given, else
    the one recorded in its ``unlearn_args.json``.
    """
    from transformers import AutoTokenizer

    from alter.config import ADAPTER_CONFIG_NAME, read_json
    from alter.model import load_adapter
    from alter.train import RUN_ARGS_FILE

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model: no such directory: {path}")
    if not os.path.exists(os.path.join(path, ADAPTER_CONFIG_NAME)):
        return _load_model(path)
    if base_model is None:
        run_file = os.path.join(path, RUN_ARGS_FILE)
        base_model = read_json(run_file).get("base_model") if os.path.exists(run_file) else None
        if base_model is None:
            raise ValueError(f"{path} holds an adapter but no {RUN_ARGS_FILE} naming its base model: pass --base-model")
    model, _ = _load_model(base_model)
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
    import torch

    from alter.config import read_json
    from alter.eval import evaluate_tofu

    model, tokenizer = load_unlearned(args.model, args.base_model)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    retain_ratios = None
    if args.retain_metrics:
        retain_ratios = read_json(args.retain_metrics).get("forget_truth_ratios")
        if retain_ratios is None:
            raise ValueError(f"--retain-metrics: {args.retain_metrics} has no 'forget_truth_ratios'")
    metrics = evaluate_tofu(model, tokenizer, _tofu_data(args.data, args.seed), retain_model_truth_ratios=retain_ratios)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(metrics, f, indent=2)
    shown = {k: metrics[k] for k in ("forget_quality", "model_utility", "forget_rouge", "retain_rouge")}
    print(json.dumps(shown, indent=2))
    return 0


# ------------------------------------------------------------------------- demo/bench


def cmd_demo(args) -> int:
    from alter.demo import run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick, methods=args.methods)
    return 0


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
    un.add_argument("--epochs", type=int, help="passes over the forget set (default: sized from the data)")
    un.add_argument("--batch-size", type=int, default=4)
    un.add_argument("--max-steps", type=int)
    un.add_argument("--lr", type=float, default=1e-5, help="learning rate of the full-parameter baselines")
    un.add_argument("--lr-a", type=float, help="learning rate of A (default 1e-3)")
    un.add_argument("--lr-b", type=float, help="learning rate of the B experts (default 3e-3)")
    un.add_argument("--router-lr", type=float, help="learning rate of the routers (default: --lr-b)")
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
    un.add_argument("--quiet", action="store_true", help="no progress bar")
    un.set_defaults(func=cmd_unlearn)

    ev = sub.add_parser("eval", help="TOFU metrics of a model or adapter directory",
                        description="Evaluate a model (or an alter unlearn output directory) on TOFU-format data "
                                    "and write the metrics as JSON.")
    ev.add_argument("--model", required=True, help="model directory or alter unlearn output directory")
    ev.add_argument("--base-model", help="base model of an adapter directory (default: the one it records)")
    ev.add_argument("--data", default="tofu_mini",
                    help="'tofu_mini' (default) or a folder of TOFU-schema files forget/retain/real_authors/"
                         "world_facts .json or .jsonl (question, answer, paraphrased_answer, perturbed_answer)")
    ev.add_argument("--retain-metrics", help="metrics JSON of a retain model (from alter eval): gives forget quality")
    ev.add_argument("--seed", type=int, default=0, help="seed of tofu_mini")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", required=True, help="metrics JSON file to write")
    ev.set_defaults(func=cmd_eval)

    quality = sub.add_parser("quality", help="unlearning quality of the default call on held-out scenarios",
                             description="Memorize fictitious-knowledge scenarios with tiny models, unlearn with "
                                         "the default call of every method and ALTER's ablations, and write "
                                         "QUALITY.md, QUALITY.json and quality_tradeoff.png.")
    quality.add_argument("--out", default="benchmarks", help="output directory (default: benchmarks)")
    quality.add_argument("--quick", action="store_true",
                         help="one scenario, one seed, 3 steps per run: checks that the suite runs (CI)")
    quality.add_argument("--seeds", type=_seed_list, help="comma-separated seeds (default: the held-out seeds)")
    quality.add_argument("--workers", type=int, default=2, help="processes, one thread each (default 2)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:  # OSError: missing files, models transformers cannot load
        parser.exit(2, f"alter {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
