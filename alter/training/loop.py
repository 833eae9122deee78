"""Unlearning: :func:`unlearn` and its loop, one harness for ALTER and the baselines.

:func:`unlearn` takes a causal LM, its tokenizer, a forget set and a retain set
(``datasets.Dataset`` with ``question``/``answer`` columns, as TOFU, or a ``text`` column,
as WMDP/MUSE corpora), trains the model in place and returns it with its run report. The
loop is method-agnostic: each method is a module of :mod:`alter.methods` that prepares
the model and data and runs the passes of a step. Methods:

- ``"alter"``: AsymLoRA guided by the base model's token entropy (entropy-weighted IHL on
  the forget set, NLL on the retain set, the structural term, the routing loss);
- ``"asym_lora"``: the same adapters and routing without entropy;
- ``"lora"``: ``"grad_diff"`` on one plain LoRA adapter (a kept name);
- ``"grad_ascent"``, ``"grad_diff"``, ``"npo"``: open-unlearning's baselines, on every
  weight by default.

Each method runs on the parameterizations it supports, ``params`` (``"full"``,
``"lora"``, ``"asym_lora"``; :mod:`alter.methods.params`).

How they train, with the measurements behind each choice (training routes, routing
targets, run length and early stop, the structural term, reproducibility):
docs/training.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from typing import Callable

import torch
from tqdm.auto import tqdm

from alter.config import AlterConfig
from alter.data import IGNORE_INDEX, pad_id_of
from alter.methods import build
from alter.methods.data import _batch, _examples_digest, model_context_length, shared_rows, step_indices
from alter.training.args import UnlearnArgs
from alter.training.checkpoint import _Checkpointer, _full_state, _save_result
from alter.training.distributed import Engine, launched
from alter.training.report import NOT_FORGOTTEN, _report
from alter.training.schedule import LabelScores, bigram_surprisal, label_scores, run_length

def _autocast_factory(device: torch.device, mixed_precision: bool):
    if mixed_precision:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _checkpointing_on(model) -> bool:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing on (non-reentrant: the adapters' frozen base needs no
    input gradients) or off."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def unlearn(
    model,
    tokenizer,
    forget,
    retain=None,
    config: AlterConfig | None = None,
    method: str = "alter",
    *,
    params: str | None = None,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    **run_args,
):
    """Unlearn ``forget`` from ``model`` while keeping ``retain``; returns the model.

    Args:
        model: a Hugging Face causal LM, trained in place: the adapter methods patch it
            with ``apply_alter``; the full-parameter baselines update its weights.
        tokenizer: its tokenizer.
        forget, retain: ``datasets.Dataset`` with ``question``/``answer`` columns or a
            ``text`` column. ``retain`` may be None for ``grad_ascent`` on params full.
        config: ``AlterConfig``: the adapters' settings (rank, experts, entropy threshold,
            ``lr_A``/``lr_B``, ...) and the loss weights ``beta``/``gamma``/``lam`` of
            ``alter`` and ``asym_lora``; default ``AlterConfig()``. The other methods'
            hyper-parameters are ``method_args`` (open-unlearning's names and defaults).
        method: one of ``METHODS``.
        params: what the method trains: ``"full"`` (every weight; the result is the
            model), ``"lora"`` (one LoRA adapter) or ``"asym_lora"`` (AsymLoRA adapters
            with routers); the adapters train on a frozen base and the result is the
            adapter. None: the method's default (``alter``, ``asym_lora``: asym_lora;
            ``lora``: lora; the others: full). A method refuses one it cannot run.
        progress: show a tqdm progress bar (main process).
        callback: ``callback(step, logs)`` after every optimizer step; ``logs`` holds
            the step's losses as floats.
        **run_args: the other fields of :class:`~alter.training.args.UnlearnArgs`, the one
            source of the run's arguments (``alter unlearn --help`` shows the same), listed
            below with their defaults. Without ``epochs`` the run length is sized from the
            data (docs/training.md, "Run length and early stop").

    The model comes back in eval mode with ``model.unlearn_report``, an
    :class:`UnlearnReport` (steps, loss trajectories, routing shares, the forget tokens'
    probability before and after), printed unless ``progress=False``; a ``UserWarning``
    says when the forget set was barely forgotten, or when the run ended before the early
    stop's share was reached. An adapted model routes with its trained router
    (no forced route) and, unless ``config.entropy_source`` is ``"precomputed"``, gets
    its token entropy from ``"lagged"`` tracking: a prepass for whole sequences (as
    ``"prepass"`` does) and the lagged entropy for tokens decoded by ``model.generate``.
    """
    unknown = sorted(set(run_args) - set(RUN_ARG_NAMES))
    if unknown:
        raise TypeError(f"unlearn() got unexpected keyword arguments {unknown}; the run's arguments are "
                        f"{list(RUN_ARG_NAMES)}")
    args = UnlearnArgs(method=method, params=params, config=config, **run_args)
    return _run(model, tokenizer, forget, retain, args, progress, callback)


# The keyword arguments of unlearn besides config and method, documented from the fields.
RUN_ARG_NAMES = tuple(f.name for f in dataclasses.fields(UnlearnArgs) if f.name not in ("method", "params", "config"))
unlearn.__doc__ += "\n    Run arguments (``UnlearnArgs`` fields, default in brackets):\n\n" + "\n".join(
    f"    - ``{f.name}`` [{f.default!r}]: {f.metadata['help']}"
    for f in dataclasses.fields(UnlearnArgs) if f.name in RUN_ARG_NAMES) + "\n"


def early_stop_counts(method) -> str:
    """What the early stop's share counts, in words."""
    if not method.forgets_unpredictable_only:
        return "still predicted (weighted)"
    return "still above their floor" if method.config.floors_forget_tokens else "still predicted"


def why_ended(stopped: bool, kept_history: list, capped: bool, args: UnlearnArgs, train_steps: int,
               still: str) -> str:
    """Why the unlearning steps ended, in words: the early stop (``still``: what its share
    counts, :func:`early_stop_counts`), the step cap or the run's length."""
    if stopped:
        step, kept = kept_history[-1]
        return (f"early stop at unlearning step {step}: {kept:.2f} of the forget tokens {still} "
                f"<= early_stop_share {args.early_stop_share}")
    if capped:
        return f"step cap: max_steps {args.max_steps}"
    sized = f"epochs {args.epochs}" if args.epochs is not None else "sized from the data"
    return f"run length: {train_steps} unlearning steps ({sized})"


def _labelled_count(examples: list[dict]) -> int:
    """Labelled tokens of encoded examples."""
    return sum(label != IGNORE_INDEX for example in examples for label in example["labels"])


def _run(model, tokenizer, forget, retain, args: UnlearnArgs, progress: bool, callback):
    """:func:`unlearn` with its arguments validated."""
    started = time.perf_counter()
    engine = None
    if args.distributed is not None or launched():
        engine = Engine(args.distributed)
        if engine.mode == "fsdp2" and args.save_every is not None:  # refused before any work
            raise ValueError("save_every under fsdp2 is not supported yet (a checkpoint holds the full optimizer "
                             "state, which FSDP2 shards); checkpoint under ddp")
        model.to(engine.device)
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    autocast = _autocast_factory(device, on_gpu if args.mixed_precision is None else args.mixed_precision)
    method = build(args, autocast, engine)
    main = engine is None or engine.is_main
    if retain is None and method.needs_retain:
        why = "" if type(method).needs_retain else f" on params {method.parameters.name!r} (the routers learn its route)"
        raise ValueError(f"method {args.method!r} needs a retain set{why} (retain is None)")
    batch_size, seed = args.batch_size, args.seed
    max_length = model_context_length(model) if args.max_length is None else args.max_length
    pad_id = pad_id_of(tokenizer)
    forget_examples = method.encode(tokenizer, forget, "forget", max_length)
    retain_examples = method.encode(tokenizer, retain, "retain", max_length) if retain is not None else []
    shared = shared_rows(forget, retain) if retain is not None else 0
    if shared and (engine is None or engine.is_main):
        warnings.warn(f"unlearn [{args.method}]: {shared} of the {len(forget)} forget rows are also in the retain "
                      "set: the forget loss pushes their tokens down while the retain loss holds them up; "
                      "drop them from one of the sets", stacklevel=3)
    encoded_forget, forget_examples = forget_examples, method.select_forget_tokens(forget_examples, retain_examples)
    if engine is not None:
        engine.check_batches(batch_size, len(forget_examples))
    # What decides the result, for the resume check and the saved record.
    run = {**args.fingerprint(), "n_forget": len(forget_examples), "n_retain": len(retain_examples),
           "data_sha256": _examples_digest(forget_examples, retain_examples)}
    checkpointer = _Checkpointer(args.output_dir, run)
    checkpoint = checkpointer.read() if args.resume else None  # refuse another run before any forward
    progress = progress and main
    if progress:
        labelled_tokens = _labelled_count(encoded_forget)
        targeted = f"{labelled_tokens} labelled tokens"
        if method.forgets_unpredictable_only:
            targeted = (f"the {_labelled_count(forget_examples)} of their {labelled_tokens} labelled tokens the "
                        "retain rows do not predict")
        print(f"unlearn [{args.method}]: targeting {len(forget_examples)} forget rows ({targeted}), keeping "
              f"{len(retain_examples)} retain rows", flush=True)
    torch.manual_seed(seed)
    forget_start = label_scores(model, forget_examples, pad_id, batch_size)

    optimizer, forget_examples, retain_examples = method.setup(model, forget_examples, retain_examples, pad_id, tokenizer)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    start_step = checkpointer.restore(checkpoint, model, names, optimizer) if checkpoint is not None else 0
    wrapped = model
    if engine is not None:
        wrapped, optimizer = engine.prepare(model, optimizer)
        model = engine.unwrap(wrapped)
        method.attach(model)
    clip_groups = method.clip_groups(model)
    router_warmup, train_steps = run_length(len(forget_examples), batch_size, args.epochs, args.router_warmup,
                                            method.parameters.trains_routers)
    capped = args.max_steps is not None and args.max_steps < train_steps
    if capped:  # max_steps counts unlearning steps; a sized warm-up shrinks with the run it precedes
        train_steps = args.max_steps
        router_warmup = router_warmup if args.router_warmup is not None else min(router_warmup, train_steps)
    total_steps = router_warmup + train_steps
    history: list[dict] = []
    kept_history: list[tuple[int, float]] = []
    stopped_at: LabelScores | None = None  # the forget set's scores where the early stop ended the run
    check_every = math.ceil(len(forget_examples) / batch_size)  # once per pass over the forget set
    # The early stop counts the forget tokens a model without the forget rows would not
    # predict: the unpredictable ones alike, else every one weighted by its surprisal.
    fact_weight = None if method.forgets_unpredictable_only else bigram_surprisal(
        forget_examples, forget_examples + retain_examples)

    checkpointing = ((on_gpu if args.gradient_checkpointing is None else args.gradient_checkpointing)
                     and not _checkpointing_on(model))
    if checkpointing:
        _set_checkpointing(model, True)
    attention = getattr(model.config, "_attn_implementation", None)
    if args.structural == "exact" and attention not in (None, "eager"):
        # Fused attention kernels (SDPA, flash) have no double backward.
        model.set_attn_implementation("eager")
    model.train()
    bar = None  # one bar per phase, each with its own total, opened when the phase starts
    for step in range(start_step, total_steps):
        if bar is None or step == router_warmup:
            if bar is not None:
                bar.close()
            warm = step < router_warmup
            bar = tqdm(total=router_warmup if warm else train_steps, initial=step if warm else step - router_warmup,
                       desc=f"{args.method}: {'router warm-up' if warm else 'unlearning steps'}", disable=not progress)
        forget_ids, retain_ids = step_indices(step, len(forget_examples), len(retain_examples), batch_size, seed)
        if engine is not None:  # this process's share of the global batch
            forget_ids = engine.share(forget_ids)
            retain_ids = None if retain_ids is None else engine.share(retain_ids)
        forget_batch = _batch(forget_examples, forget_ids, pad_id, device)
        retain_batch = _batch(retain_examples, retain_ids, pad_id, device) if method.needs_retain else None
        optimizer.zero_grad(set_to_none=True)
        if step < router_warmup:
            logs = method.warmup_step(wrapped, forget_batch, retain_batch)
        else:
            logs = method.step(wrapped, forget_batch, retain_batch)
        if engine is not None:
            logs = engine.mean(logs)
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"unlearn: non-finite loss at step {step + 1}: {logs}")
        if args.max_grad_norm is not None:
            for params in clip_groups:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        history.append(logs)
        if callback is not None:
            callback(step + 1, logs)
        if args.save_every is not None and (step + 1) % args.save_every == 0:
            checkpointer.save(step + 1, _full_state(model, names, engine), optimizer, main)
        if args.early_stop_share is not None and step >= router_warmup \
                and (step + 1 - router_warmup) % check_every == 0 and step + 1 < total_steps:
            scores = label_scores(model, forget_examples, pad_id, batch_size)
            kept = scores.kept_share(forget_start, fact_weight)
            kept_history.append((step + 1 - router_warmup, kept))  # numbered in unlearning steps
            if kept <= args.early_stop_share:
                stopped_at = scores
                break
    ended = why_ended(stopped_at is not None, kept_history, capped, args, train_steps, early_stop_counts(method))
    if bar is not None:
        bar.set_postfix_str(ended.split(":")[0])
        bar.close()
    if checkpointing:
        _set_checkpointing(model, False)
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    model.eval()
    report = _report(model, method, forget_examples, retain_examples, pad_id, batch_size, history,
                     start_step, router_warmup, forget_start, fact_weight, kept_history, stopped_at,
                     time.perf_counter() - started, ended)
    model.unlearn_report = report
    if progress:
        print(report)
    if main and report.verdict == NOT_FORGOTTEN:
        warnings.warn(f"unlearn [{args.method}]: the forget set is {NOT_FORGOTTEN}: its tokens' mean probability "
                      f"went {forget_start.probability:.3g} -> {report.forget_probability_after:.3g}; "
                      "train longer (epochs) or with larger learning rates", stacklevel=3)
    elif (main and args.early_stop_share is not None and args.max_steps is None and not report.stopped_early
          and report.forget_kept_share > args.early_stop_share):
        warnings.warn(f"unlearn [{args.method}]: the run ended after {report.steps} steps with "
                      f"{report.forget_kept_share:.2f} of the forget tokens {early_stop_counts(method)}, above "
                      f"early_stop_share {args.early_stop_share}: more epochs would forget more", stacklevel=3)
    state = engine.full_state_dict(model) if engine is not None and args.output_dir is not None else None
    if args.output_dir is not None and main:
        # The config the result runs with (a method may change the given one: the adapter
        # methods gate generation by lagged entropy), as its adapter_config.json says.
        record = {**args.record(), **run, "config": method.config.to_dict(), "router_warmup_steps": router_warmup,
                  "steps": max(0, start_step + len(history) - router_warmup), "stopped_early": report.stopped_early}
        _save_result(model, tokenizer, args.output_dir, method, record, state)
        report.save(args.output_dir)
    if engine is not None:
        engine.wait()
    return model
