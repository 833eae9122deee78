"""The arguments of an unlearning run, validated in one place.

Each field's ``metadata["help"]`` documents it in one line (``alter unlearn``'s flags are
generated from the fields). Its ``metadata["role"]`` says what it is for: ``"fingerprint"``
fields decide the result (a resume with another value is refused) and are saved in the run
record; ``"record"`` fields are saved only (``epochs``: a resumed run may be extended); the
rest (where output goes, how it is computed) are neither.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from alter.config import AlterConfig

STRUCTURAL_MODES = ("surrogate", "exact")
DISTRIBUTED_MODES = ("ddp", "fsdp2")
# unlearn's default early stop (docs/training.md, "Run length and early stop"): the share
# of the forget tokens weighted by surprisal, or of the unpredictable ones under
# AlterConfig.forget_tokens="unpredictable" (docs/training.md, "Forget tokens").
DEFAULT_EARLY_STOP_SHARE = 0.4
UNPREDICTABLE_EARLY_STOP_SHARE = 0.25
PARAMS = ("full", "lora", "asym_lora")  # alter.methods.params.PARAMS, without importing torch
NPO_BETA = 0.1  # npo_beta's default (deprecated: method_args={"beta": ...})


def _field(role: str | None, default, help: str, **metadata):
    """A field with its ``metadata``: ``role`` (module doc), ``help`` (one line, shown by
    ``alter unlearn --help``, whose flags are generated from these fields) and, for
    string fields with a fixed set of values, ``choices``."""
    return field(default=default, metadata={"role": role, "help": help, **metadata})


def check_early_stop_share(share) -> None:
    """ValueError unless ``share`` is a number in [0, 1), ``"auto"`` or None (``unlearn``'s early stop)."""
    if share is not None and share != "auto" and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1):
        raise ValueError(f"early_stop_share must be a number in [0, 1), 'auto' or None, got {share!r}")


def check_positive(name: str, value, kind=int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def check_positive_number(name: str, value, none_ok: bool = False) -> None:
    """ValueError unless ``value`` is an int or float > 0 (or None when ``none_ok``)."""
    if none_ok and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number{' or None' if none_ok else ''}, got {value!r}")


@dataclass
class UnlearnArgs:
    """Everything :func:`alter.unlearn` takes besides the model, tokenizer and data, each
    field under its own name with its help in ``metadata["help"]``. ``config`` None becomes
    ``AlterConfig()``."""

    method: str = _field("fingerprint", "alter", "unlearning method")
    params: str | None = _field(
        "fingerprint", None, "what the method trains: every weight (full), one LoRA adapter (lora) or AsymLoRA "
        "adapters (asym_lora) (None: the method's default)", choices=PARAMS)
    method_args: dict | None = _field(
        "fingerprint", None, "the method's hyper-parameters over its defaults (open-unlearning's names and "
        "values), e.g. {'beta': 0.2} (None: {})")
    config: AlterConfig | None = _field(
        "fingerprint", None, "AlterConfig: the adapters' settings (lora, asym_lora) and the loss weights "
        "beta/gamma/lam of alter and asym_lora (None: AlterConfig())")
    seed: int = _field("fingerprint", 0, "seeds the adapter initialization, dropout, data order and k-means")
    batch_size: int = _field(
        "fingerprint", 4, "samples per batch, each forget batch paired with a retain batch of the same size; "
        "under a launcher, the global batch")
    lr: float | None = _field(
        "fingerprint", None, "learning rate of params full (AdamW) (None: sized from the model, "
        "alter.methods.params.full_lr)")
    router_warmup: int | None = _field(
        "fingerprint", None, "adapter methods: router-only steps before the unlearning steps, apart from "
        "max_steps (None: sized from the data, as many as the unlearning steps, at most 200)")
    router_lr: float | None = _field(
        "fingerprint", None, "adapter methods: learning rate of the routers (None: the config's lr_B)")
    early_stop_share: float | str | None = _field(
        "fingerprint", "auto", "stop once at most this share of the forget tokens predicted at the start is still "
        f"predicted, checked after each pass over the forget set (auto: {UNPREDICTABLE_EARLY_STOP_SHARE} of the "
        f"unpredictable tokens under config.forget_tokens 'unpredictable', else {DEFAULT_EARLY_STOP_SHARE} "
        "weighted by surprisal; None: run every step)")
    structural: str = _field(
        "fingerprint", "surrogate", "structural term: the cheap surrogate or the exact double backward (eager "
        "backend, small models)", choices=STRUCTURAL_MODES)
    npo_beta: float = _field("fingerprint", NPO_BETA, "deprecated: npo's method_args beta")
    max_grad_norm: float | None = _field("fingerprint", 1.0, "gradient-norm clipping (None: off)")
    # as given: None is the model's context
    max_length: int | None = _field(
        "fingerprint", None, "longest example in tokens; a longer one is an error, not truncated "
        "(None: the model's context)")
    epochs: int | None = _field("record", None, "passes over the forget set (None: sized from the data)")
    max_steps: int | None = _field(
        None, None, "stop after this many unlearning steps, the router warm-up apart (None: every epoch, or the "
        "early stop)")
    output_dir: str | None = _field(
        None, None, "where the result (adapter or model, tokenizer, unlearn_args.json) and checkpoints go")
    save_every: int | None = _field(None, None, "write a checkpoint every this many steps (None: no checkpoints)")
    resume: bool = _field(None, False, "continue from the checkpoint in the output directory, if there is one")
    mixed_precision: bool | None = _field(None, None, "bf16 autocast (None: on when the model is on a GPU)")
    gradient_checkpointing: bool | None = _field(
        None, None, "recompute activations in the backward (None: on when the model is on a GPU)")
    distributed: str | None = _field(
        None, None, "under torchrun: data-parallel (ddp) or sharded (fsdp2) through accelerate (None: one "
        "process, or the config of accelerate launch)", choices=DISTRIBUTED_MODES)

    def __post_init__(self):
        from alter.methods import method_class, method_names

        if self.method not in method_names():
            raise ValueError(f"method must be one of {method_names()}, got {self.method!r}")
        cls = method_class(self.method)
        cls.resolve_params(self.params)  # refuses a pair the method cannot run, with the reason
        if self.method_args is None:
            self.method_args = {}
        elif not isinstance(self.method_args, dict):
            raise TypeError(f"method_args must be a dict, got {type(self.method_args).__name__}")
        self._fold_npo_beta()
        cls.method_hparams(self.method_args)  # refuses unknown keys, listing the known ones
        if self.config is None:
            self.config = AlterConfig()
        elif not isinstance(self.config, AlterConfig):
            raise TypeError(f"config must be an AlterConfig, got {type(self.config).__name__}")
        default = AlterConfig()
        if not cls.reads_config_weights and (self.config.beta, self.config.gamma) != (default.beta, default.gamma):
            raise ValueError(f"config.beta/gamma weight alter's and asym_lora's terms; {self.method!r} takes its "
                             f"weights from method_args (its hyper-parameters: {cls.defaults})")
        if self.structural not in STRUCTURAL_MODES:
            raise ValueError(f"structural must be one of {STRUCTURAL_MODES}, got {self.structural!r}")
        if self.structural == "exact":
            if self.config.backend not in (None, "eager"):
                raise ValueError(
                    f"structural='exact' needs the eager backend, but config.backend is {self.config.backend!r}")
            self.config = dataclasses.replace(self.config, backend="eager")
        if self.epochs is not None:
            check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        check_positive_number("lr", self.lr, none_ok=True)
        check_positive_number("max_grad_norm", self.max_grad_norm, none_ok=True)
        if self.max_length is not None:
            check_positive("max_length", self.max_length)
        if self.max_steps is not None:
            check_positive("max_steps", self.max_steps)
        if self.save_every is not None:
            check_positive("save_every", self.save_every)
            if self.output_dir is None:
                raise ValueError("save_every needs output_dir, where the checkpoints go")
        if self.resume and self.output_dir is None:
            raise ValueError("resume=True needs output_dir, where the checkpoint is")
        warmup = self.router_warmup
        if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0):
            raise ValueError(f"router_warmup must be an int >= 0, got {warmup!r}")
        for name in ("router_warmup", "router_lr"):
            if getattr(self, name) and not cls.routed(self.params):
                raise ValueError(f"{name} is for the adapter methods (params lora, asym_lora); {self.method!r} on params "
                                 f"{cls.resolve_params(self.params)!r} has no router")
        check_positive_number("router_lr", self.router_lr, none_ok=True)
        check_early_stop_share(self.early_stop_share)
        if self.early_stop_share == "auto":
            unpredictable = cls.reads_config_weights and self.config.forget_tokens == "unpredictable"
            self.early_stop_share = UNPREDICTABLE_EARLY_STOP_SHARE if unpredictable else DEFAULT_EARLY_STOP_SHARE
        if self.distributed is not None and self.distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES} or None, got {self.distributed!r}")

    def _fold_npo_beta(self) -> None:
        """npo_beta, kept for old calls: a value other than its default warns and, for npo,
        becomes method_args["beta"]."""
        check_positive_number("npo_beta", self.npo_beta)
        if self.npo_beta == NPO_BETA:
            return
        warnings.warn("npo_beta is deprecated: pass method_args={'beta': ...} (--method-arg beta=...)",
                      DeprecationWarning, stacklevel=4)
        if self.method != "npo":
            return
        if self.method_args.get("beta", self.npo_beta) != self.npo_beta:
            raise ValueError(f"npo_beta={self.npo_beta} and method_args beta={self.method_args['beta']} disagree; "
                             "pass method_args beta only")
        self.method_args = {**self.method_args, "beta": float(self.npo_beta)}

    def _fields(self, roles) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["role"] in roles}
        if "config" in values:
            values["config"] = self.config.to_dict()
        return values

    def fingerprint(self) -> dict:
        """What decides the result: a checkpoint resumes only a run with the same."""
        return self._fields(("fingerprint",))

    def record(self) -> dict:
        """What the saved run record (``unlearn_args.json``) holds of the arguments."""
        return self._fields(("fingerprint", "record"))
