"""What every unlearning method is: a loss over a forget and a retain batch,
``loss(model, forget, retain) -> (loss, logs)`` (open-unlearning's ``compute_loss``
shape), its hyper-parameters and the things it declares it needs. The parameterization
it trains (``"full"``, ``"lora"``, ``"asym_lora"``: :mod:`alter.methods.params`) is a
choice apart: the method's forwards go through :meth:`Method.logits` /
:meth:`Method.outputs`, which run them under the chosen parameterization, and the
parameterization's own term (the routers' loss under the adapters) is added by
:meth:`Method.step`, so that every loss runs on every parameterization it supports.

A method is built from the run's ``alter.training.args.UnlearnArgs`` and an autocast
factory. :meth:`Method.setup` prepares the examples (the parameterization's fields, then
:meth:`Method.prepare`: the fields its loss reads, e.g. NPO's reference
log-probabilities) and the parameters, and returns the optimizer; :meth:`Method.step`
runs one loss and its backward.

Under a distributed run each process gets its share of the global batch; the loss is
computed with the engine's wrapped model (``model``, for the forwards) while the routing
contexts act on the unwrapped one (``self.model``). Each term is a mean over the tokens
(or samples) of the process's batch; :meth:`Method.global_mean` rescales it so that the
engine's gradient averaging over processes gives the gradient of the mean over the global
batch (the single-process gradient).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from alter.data import IGNORE_INDEX
from alter.methods.data import _model_inputs, encode_dataset
from alter.methods.forget_tokens import split_predictable
from alter.methods.losses import _floats, labelled_rows, shift_labels, shift_targets, token_nll
from alter.methods.params import PARAMETERIZATIONS, PARAMS, frozen_copy
from alter_kernels import inverted_hinge_loss
from alter_kernels.ihl import token_weights


class Method:
    """One unlearning method. A subclass sets ``name``, its ``defaults``, declares what it
    needs and implements :meth:`loss` (and :meth:`prepare` when its loss reads per-example
    fields)."""

    name: str = ""
    default_params = "full"  # the parameterization of UnlearnArgs.params=None
    supported_params: tuple[str, ...] = PARAMS
    refused_params: dict[str, str] = {}  # params -> why this method refuses it
    needs_retain = True  # False: the loss never reads a retain batch (the adapters' routers still do)
    needs_reference = False  # True: the loss reads reference_outputs (the starting model's)
    # Hyper-parameters with open-unlearning's values (each method cites its config);
    # self.hparams = these updated by UnlearnArgs.method_args.
    defaults: dict = {}
    # Whether the loss reads AlterConfig's beta/gamma/lam (the adapter objectives); the
    # others take their weights from method_args, and refuse a config that sets them.
    reads_config_weights = False

    def __init__(self, args, autocast, engine=None):
        # args: the run's alter.training.args.UnlearnArgs (a layer above the methods)
        self.args = args
        self.config = args.config
        self.autocast = autocast
        # engine: an alter.training.distributed.Engine (None: one process, plain autograd)
        self.reduce_sum = engine.reduce_sum if engine is not None and engine.world > 1 else None
        self.world = 1 if engine is None else engine.world
        self.backward = engine.backward if engine is not None else torch.Tensor.backward
        self.distributed = engine is not None
        self.hparams = self.method_hparams(args.method_args)
        self.parameters = PARAMETERIZATIONS[self.resolve_params(args.params)](self)
        # The routers learn the retained data's route: an adapter run reads the retain set.
        self.needs_retain = type(self).needs_retain or self.parameters.routed
        self.has_forget_experts = self.parameters.has_forget_experts
        self.model = None
        self.reference_model = None

    # ------------------------------------------------------- validation (API boundary)

    @classmethod
    def resolve_params(cls, params: str | None) -> str:
        """The parameterization of ``params`` (None: the method's default); ValueError
        with the reason when the method refuses it."""
        if params is None:
            return cls.default_params
        if params not in PARAMS:
            raise ValueError(f"params must be one of {PARAMS} or None (the method's default), got {params!r}")
        if params not in cls.supported_params:
            why = cls.refused_params.get(params, f"it supports {cls.supported_params}")
            raise ValueError(f"method {cls.name!r} does not run on params={params!r}: {why}")
        return params

    @classmethod
    def method_hparams(cls, method_args: dict) -> dict:
        """``defaults`` updated by ``method_args``; ValueError on an unknown key or a value
        of another type than its default's (an int is a float)."""
        unknown = sorted(set(method_args) - set(cls.defaults))
        if unknown:
            known = ", ".join(sorted(cls.defaults)) or "none"
            raise ValueError(f"method {cls.name!r} has no method_args {unknown}; its hyper-parameters: {known}")
        for key, value in method_args.items():
            kind = type(cls.defaults[key])
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if not ok and not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"method_args {key!r} of {cls.name!r} must be a {kind.__name__} "
                                 f"(default {cls.defaults[key]!r}), got {value!r}")
        return {**cls.defaults, **{k: float(v) if type(cls.defaults[k]) is float else v
                                   for k, v in method_args.items()}}

    @classmethod
    def routed(cls, params: str | None = None) -> bool:
        """Whether the method on ``params`` (None: its default) trains routers (and so has
        a router warm-up and reads the retain set)."""
        return PARAMETERIZATIONS[cls.resolve_params(params)].routed

    # ----------------------------------------------------------------- setup

    def setup(self, model, forget_examples: list[dict], retain_examples: list[dict], pad_id: int,
              tokenizer=None):
        """Prepare ``model`` and the examples (all processes alike). Returns the optimizer
        and the forget and retain examples to train on (new dicts with the
        parameterization's and the method's per-example fields; the given ones stay as
        they are). ``tokenizer``: the examples' (the sequence route's keys then hold each
        name's other spacings too)."""
        forget_examples, retain_examples, changes = self.parameters.prepare(
            model, forget_examples, retain_examples, pad_id, tokenizer)
        forget_examples, retain_examples = self.prepare(model, forget_examples, retain_examples, pad_id)
        if self.parameters.adapter:  # the config sets up adapters only
            changes = {**changes, **self.config_changes(self.config)}
        self.config = dataclasses.replace(self.config, **changes) if changes else self.config
        if self.needs_reference and not self.parameters.adapter:
            self.reference_model = frozen_copy(model)  # before any step: the starting model
        optimizer = self.parameters.setup(model, self.config)
        self.attach(model)
        return optimizer, forget_examples, retain_examples

    def encode(self, tokenizer, data, name: str, max_length: int | None) -> list[dict]:
        """The examples of split ``name`` (``"forget"`` or ``"retain"``):
        :func:`~alter.methods.data.encode_dataset`, unless the method reads more of the rows
        (DPO's preferred answers)."""
        return encode_dataset(tokenizer, data, name, max_length)

    def prepare(self, model, forget_examples: list[dict], retain_examples: list[dict], pad_id: int):
        """The examples with the fields the loss reads (default: as given). ``model`` is
        the starting model (not yet patched); add fields with
        :func:`alter.methods.data.with_fields`."""
        return forget_examples, retain_examples

    def config_changes(self, config) -> dict:
        """Changes to the user's config (the adapters' settings) for this method: A learns
        from every token (learning from high-entropy tokens only is ALTER's guidance)."""
        return {"a_learns_from_high_entropy_only": False}

    def attach(self, model) -> None:
        """Read the parameters from ``model`` (the unwrapped model), again after an engine
        replaced them (FSDP2 makes them sharded tensors)."""
        self.model = model
        self.parameters.attach(model)

    def clip_groups(self, model) -> list[list[torch.nn.Parameter]]:
        return self.parameters.clip_groups(model)

    def save(self, model, directory: str, state: dict | None = None) -> None:
        self.parameters.save(model, directory, state)

    # -------------------------------------------------------------- forwards

    def outputs(self, model, batch: dict, forget: bool | None = None, **model_kwargs):
        """The Hugging Face output of a forward that trains, under the parameterization
        (full: plain; lora: the one adapter; asym_lora: forget rows to their sub-domain
        expert, retain rows to expert 0). ``forget``: whether ``batch`` is the forget batch
        (the adapters need it; full ignores it). ``model_kwargs``: e.g.
        ``output_hidden_states=True``."""
        with self.parameters.forward_context(batch, forget), self.autocast():
            return model(**_model_inputs(batch), **model_kwargs)

    def logits(self, model, batch: dict, forget: bool | None = None) -> torch.Tensor:
        """The logits [B, L, V] of :meth:`outputs`."""
        return self.outputs(model, batch, forget).logits

    @torch.no_grad()
    def reference_outputs(self, model, batch: dict, **model_kwargs):
        """The starting model's output for ``batch``, without gradient, in eval mode: the
        adapters disabled under lora/asym_lora, else the frozen copy made at setup (a
        method that calls this sets ``needs_reference``)."""
        if self.parameters.adapter:
            context = self.parameters.reference_context(batch)
        elif self.reference_model is None:
            raise RuntimeError(f"method {self.name!r} reads reference_outputs: set needs_reference = True")
        else:
            model, context = self.reference_model, contextlib.nullcontext()
        with context, self.autocast():
            return model(**_model_inputs(batch), **model_kwargs)

    # ------------------------------------------------------------------ loss

    def global_mean(self, loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``loss``, a mean over ``count`` local items, rescaled to the share of the mean over
        all processes' items whose gradient, averaged over processes, is that mean's."""
        if self.reduce_sum is None:
            return loss
        count = count.detach().float()
        total = self.reduce_sum(count.clone())
        return loss * (count * self.world / total.clamp_min(1))

    def loss(self, model, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict]:
        """The method's loss (a scalar with gradient) and its terms to log (detached)."""
        raise NotImplementedError

    def step(self, model, forget: dict, retain: dict | None) -> dict:
        """Loss (the method's plus the parameterization's term) and backward of one
        unlearning step; returns the logged terms as floats."""
        loss, logs = self.loss(model, forget, retain)
        extra, extra_logs = self.parameters.loss(model, forget, retain)
        loss = loss + extra
        self.backward(loss)
        return _floats({**logs, **extra_logs, "loss": loss.detach()})

    def warmup_step(self, model, forget: dict, retain: dict | None) -> dict:
        """A router warm-up step (adapter parameterizations only)."""
        return self.parameters.warmup_step(model, forget, retain)

    @property
    def forgets_unpredictable_only(self) -> bool:
        """Whether the forget tokens are split into those the retain rows do not predict
        (the forget loss's) and those they do (the kept term's; under the floor each goes
        where :meth:`toward_floor` puts it) (``config.forget_tokens``, read by the methods
        that take their weights from the config): the examples then carry ``keep_labels``
        (:func:`alter.methods.forget_tokens.split_predictable`)."""
        return self.reads_config_weights and self.config.forget_tokens == "unpredictable"

    def select_forget_tokens(self, forget_examples: list[dict], retain_examples: list[dict]) -> list[dict]:
        """The forget examples the loss trains on: split by
        :func:`alter.methods.forget_tokens.split_predictable` when :attr:`forgets_unpredictable_only`,
        else as given (the trainer and the step benchmark both call this)."""
        if not self.forgets_unpredictable_only:
            return forget_examples
        return split_predictable(forget_examples, retain_examples, floor=self.config.floors_forget_tokens,
                                 template=self.config.template_tokens)

    def toward_floor(self, logits, forget: dict) -> dict:
        """The forget batch as its losses see it at this step. Under the floor
        (``config.forget_floor``; the batch carries ``forget_floor`` and ``keep_labels``)
        each labelled token, unpredictable or kept, is aimed at its floor: ``labels`` holds
        every one whose log-probability in ``logits`` ``[B, L, V]`` is above its floor (the
        forget loss pushes it down), ``keep_labels`` the kept ones below theirs (the kept
        term holds them up); a token at its floor is in neither. A new dict, no gradient
        through the choice. Without a floor the batch as it is."""
        if "forget_floor" not in forget:
            return forget
        labels, kept = forget["labels"], forget["keep_labels"]
        targets = torch.where(labels != IGNORE_INDEX, labels, kept)  # one of the two per token
        with torch.no_grad():
            _, logprob, _, rows = labelled_rows(logits, targets)
            floor = shift_targets(forget["forget_floor"], 0.0)[rows]
            above, below = torch.zeros_like(rows), torch.zeros_like(rows)
            above[rows], below[rows] = logprob > floor, logprob < floor
        # row t predicts label t + 1
        above, below = (mask.view(labels.shape)[:, :-1] for mask in (above, below))
        pushed, held = labels.clone(), kept.clone()
        pushed[:, 1:] = torch.where(above, targets[:, 1:], IGNORE_INDEX)
        held[:, 1:] = torch.where(below, kept[:, 1:], IGNORE_INDEX)
        return {**forget, "labels": pushed, "keep_labels": held}

    def with_kept_tokens(self, loss, logs: dict, logits, forget: dict):
        """``loss`` plus ``config.gamma`` times the mean NLL of the forget batch's
        predictable tokens (``keep_labels``; under the floor those below it, as
        :meth:`toward_floor` leaves them), kept as retained tokens are (logged as
        ``"kept"``); ``loss`` as it is when the batch has no ``keep_labels``. ``logits``
        ``[B, L, V]``, the forget batch's; the NLL in float32 (float64 for float64 logits),
        over the labelled rows only (:func:`~alter.methods.losses.labelled_rows`)."""
        if "keep_labels" not in forget:
            return loss
        _, logprob, _, rows = labelled_rows(logits, forget["keep_labels"])
        count = rows.sum()
        kept = -logprob.sum() / count.clamp_min(1)  # 0 for a batch without predictable tokens
        logs["kept"] = kept.detach()
        return loss + self.config.gamma * self.global_mean(kept, count)

    def ihl(self, logits, labels, high_entropy_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(forget loss, the weight sum it is a mean over): the inverted hinge loss with
        high-entropy tokens weighted by ``high_entropy_weight`` (or ``config.forget_loss``
        ``"nll_ascent"``: ascent on the NLL)."""
        if self.config.forget_loss == "nll_ascent":
            return -token_nll(logits, labels), labelled(labels)
        flat_logits, flat_labels = shift_labels(logits, labels)
        loss, entropy = inverted_hinge_loss(
            flat_logits, flat_labels, self.config.tsallis_q, self.config.entropy_threshold,
            high_entropy_weight=high_entropy_weight, backend=self.config.backend,
        )
        if self.reduce_sum is None:
            return loss, None
        count = token_weights(entropy, flat_labels == IGNORE_INDEX, self.config.entropy_threshold, high_entropy_weight)
        return loss, count.sum()


def labelled(labels: torch.Tensor) -> torch.Tensor:
    """Labelled next-token targets of a batch (the count ``token_nll`` averages over)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
