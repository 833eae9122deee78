"""Input checks at the API boundary: clear errors instead of kernel crashes or NaN."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes=None, min_ndim: int | None = None) -> None:
    """Raise TypeError/ValueError when ``t`` is not a tensor of the expected rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(op: str, **tensors) -> torch.device:
    """Raise ValueError unless every given tensor (None is skipped) is on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    return first


def check_rows_finite_somewhere(op: str, logits: torch.Tensor) -> None:
    """Reject rows whose every logit is -inf: their softmax is undefined."""
    if not logits.numel():
        return
    all_masked = (logits == float("-inf")).all(dim=-1)
    if bool(all_masked.any()):
        bad = all_masked.nonzero()[0].tolist()
        raise ValueError(f"{op}: logits row {tuple(bad)} is all -inf; its distribution is undefined")


def check_row_max_finite(op: str, row_max: torch.Tensor) -> None:
    """Reject rows whose logits were all -inf, seen by the kernels as a row max of -inf.

    Kernel backends check this [T] output instead of scanning the [T, V] logits again."""
    bad = torch.isneginf(row_max)
    if bool(bad.any()):
        raise ValueError(f"{op}: logits row {int(bad.nonzero()[0])} is all -inf; its distribution is undefined")
