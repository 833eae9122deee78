"""The arguments of an unlearning run, validated in one place.

Each field's ``metadata["role"]`` says what it is for: ``"fingerprint"`` fields decide the
result (a resume with another value is refused) and are saved in the run record;
``"record"`` fields are saved only (``epochs``: a resumed run may be extended); the rest
(where output goes, how it is computed) are neither.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from alter.config import AlterConfig

STRUCTURAL_MODES = ("surrogate", "exact")
DISTRIBUTED_MODES = ("ddp", "fsdp2")
# unlearn's default early stop (alter.train module doc, "Run length").
DEFAULT_EARLY_STOP_SHARE = 0.4


def _role(role: str | None, default):
    return field(default=default, metadata={"role": role})


def check_early_stop_share(share) -> None:
    """ValueError unless ``share`` is a number in [0, 1) or None (``unlearn``'s early stop)."""
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1):
        raise ValueError(f"early_stop_share must be a number in [0, 1) or None, got {share!r}")


def check_positive(name: str, value, kind=int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


@dataclass
class UnlearnArgs:
    """Everything :func:`alter.unlearn` takes besides the model, tokenizer and data (its
    docstring documents each field). ``config`` None becomes ``AlterConfig()``."""

    method: str = _role("fingerprint", "alter")
    config: AlterConfig | None = _role("fingerprint", None)
    seed: int = _role("fingerprint", 0)
    batch_size: int = _role("fingerprint", 4)
    lr: float = _role("fingerprint", 1e-5)
    router_warmup: int | None = _role("fingerprint", None)
    router_lr: float | None = _role("fingerprint", None)
    early_stop_share: float | None = _role("fingerprint", DEFAULT_EARLY_STOP_SHARE)
    structural: str = _role("fingerprint", "surrogate")
    npo_beta: float = _role("fingerprint", 0.1)
    max_grad_norm: float | None = _role("fingerprint", 1.0)
    # as given: None is the model's context
    max_length: int | None = _role("fingerprint", None)
    epochs: int | None = _role("record", None)
    max_steps: int | None = _role(None, None)
    output_dir: str | None = _role(None, None)
    save_every: int | None = _role(None, None)
    resume: bool = _role(None, False)
    mixed_precision: bool | None = _role(None, None)
    gradient_checkpointing: bool | None = _role(None, None)
    distributed: str | None = _role(None, None)

    def __post_init__(self):
        from alter.methods import METHODS, ADAPTER_METHODS

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.config is None:
            self.config = AlterConfig()
        elif not isinstance(self.config, AlterConfig):
            raise TypeError(f"config must be an AlterConfig, got {type(self.config).__name__}")
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
            if getattr(self, name) and self.method not in ADAPTER_METHODS:
                raise ValueError(f"{name} is for the adapter methods {ADAPTER_METHODS}; {self.method!r} has no router")
        lr = self.router_lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"router_lr must be a positive number or None, got {lr!r}")
        check_early_stop_share(self.early_stop_share)
        if self.distributed is not None and self.distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES} or None, got {self.distributed!r}")

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
