"""Backend selection shared by every op.

An op declares which backends it implements; :func:`resolve_backend` picks one from,
in order: the ``backend`` argument, the ``ALTER_BACKEND`` environment variable, the best
available for the tensor's device (triton on CUDA, the compiled extension on CPU, else
eager). Asking for a backend by name that cannot run raises ``BackendUnavailable``
saying why, instead of failing inside a kernel.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from functools import lru_cache
from typing import Callable, NamedTuple

import torch

BACKENDS = ("eager", "triton", "cpp")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here."""


class KernelPair(NamedTuple):
    """One backend's forward and backward functions of an op, in the split that the op's
    autograd Function calls (each op module documents its split)."""

    forward: Callable
    backward: Callable


@lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """Why triton cannot be used at all (None when it imports)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_interpret() -> bool:
    """True when the Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` was
    set when alter_kernels was imported (see ``alter_kernels._triton``)."""
    from alter_kernels._triton import INTERPRETED

    return INTERPRETED


def triton_interpreter_mismatch() -> str | None:
    """Why the CPU interpreter cannot run the kernels although one of the two moments asked
    for it: ``TRITON_INTERPRET`` now differs from when alter_kernels was imported (the
    kernels were built for the GPU; or the interpreter, which reads the variable again
    while it runs, would fail). None when there is no such mismatch."""
    import triton

    now = bool(triton.knobs.runtime.interpret)
    if now and not triton_interpret():
        return (
            "TRITON_INTERPRET=1 was set after alter_kernels was imported, so its triton kernels were "
            "built for the GPU; set it before importing alter_kernels to run them in the CPU interpreter"
        )
    if triton_interpret() and not now:
        return (
            "TRITON_INTERPRET was unset after alter_kernels was imported with it; the interpreted triton "
            "kernels need it set while they run"
        )
    return None


def device_guard(device: torch.device):
    """Context making ``device`` the current CUDA device around a Triton launch.

    Triton launches on the current device (and its current stream); tensors on another
    GPU, as in a model split over GPUs (``device_map="auto"``), would be read from the
    wrong device. A no-op for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@lru_cache(maxsize=None)
def cpp_extension():
    """The compiled extension module ``alter_kernels._C``, or None (warns once)."""
    try:
        from alter_kernels import _C  # noqa: F401  (loading it registers torch.ops.alter_kernels.*)
    except ImportError as exc:
        warnings.warn(
            "alter_kernels: the compiled extension alter_kernels._C is not built "
            f"({exc}); the 'cpp' backend is unavailable and CPU ops use the eager path. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    import alter_kernels._ops_fake  # noqa: F401  (fake kernels: the ops trace under torch.compile)

    return _C


def cpp_has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    ext = cpp_extension()
    return ext is not None and bool(getattr(ext, "WITH_CUDA", False))


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    if backend == "eager":
        return None
    if backend == "triton":
        err = triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            mismatch = triton_interpreter_mismatch()
            if mismatch:
                return mismatch
            if triton_interpret():
                return None
        return (
            f"triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing alter_kernels to run them in the CPU interpreter"
        )
    if backend == "cpp":
        if cpp_extension() is None:
            return "the compiled extension alter_kernels._C is not built"
        if device.type == "cpu":
            return None
        if device.type == "cuda" and cpp_has_cuda():
            return None
        return f"the compiled extension has no kernels for {device.type} tensors"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")


def resolve_backend(op: str, backend: str | None, device: torch.device, implemented: tuple[str, ...]) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``implemented`` lists the backends ``op`` has (always including "eager").
    An explicit ``backend`` must be implemented and available. ``ALTER_BACKEND`` is a
    preference: it must be a known, available backend, and ops that do not implement it
    use their best available one.
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS} or None")
        if backend not in implemented:
            raise BackendUnavailable(f"{op}: has no {backend!r} backend (it has {implemented})")
        why = unavailable_reason(backend, device)
        if why:
            raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {why}")
        return backend
    env = os.environ.get("ALTER_BACKEND") or None
    if env is not None:
        if env not in BACKENDS:
            raise ValueError(f"ALTER_BACKEND={env!r} is not one of {BACKENDS}")
        why = unavailable_reason(env, device)
        if why:
            raise BackendUnavailable(f"ALTER_BACKEND={env!r} is unavailable for {op}: {why}")
        if env in implemented:
            return env
    preference = ("triton", "cpp") if device.type == "cuda" else ("cpp",)
    for candidate in preference:
        if candidate in implemented and unavailable_reason(candidate, device) is None:
            return candidate
    return "eager"


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Map each backend to None (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    return {b: unavailable_reason(b, device) for b in BACKENDS}
