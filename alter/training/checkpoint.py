"""What a run writes to ``output_dir``: the checkpoint ``checkpoint.pt`` (trainable
parameters, optimizer, step, RNG state, the run's fingerprint) from which ``resume=True``
continues, and the result (adapter or model, tokenizer, ``unlearn_args.json``)."""
from __future__ import annotations

import json
import os

import torch

from alter.files import first_line, staged_directory

CHECKPOINT_FILE = "checkpoint.pt"
RUN_ARGS_FILE = "unlearn_args.json"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Checkpointer:
    """Writes and reads ``output_dir/checkpoint.pt``: trainable parameters, optimizer,
    step, RNG state, and a fingerprint of the run so that a resume with other settings
    fails loudly instead of mixing two runs."""

    def __init__(self, output_dir: str | None, fingerprint: dict):
        self.path = None if output_dir is None else os.path.join(output_dir, CHECKPOINT_FILE)
        self.fingerprint = fingerprint

    def save(self, step: int, params: dict, optimizer, write: bool = True) -> None:
        """Save ``params`` (full tensors) and the optimizer; only where ``write`` (the
        main process of a distributed run)."""
        if not write:
            return
        state = {
            "step": step,
            "fingerprint": self.fingerprint,
            "params": {name: p.detach().cpu() for name, p in params.items()},
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
        }
        # staged and renamed: a run killed mid-write keeps the previous checkpoint
        with staged_directory(os.path.dirname(self.path)) as staging:
            torch.save(state, os.path.join(staging, CHECKPOINT_FILE))

    def read(self) -> dict | None:
        """The checkpoint's state (None when there is none), after checking that this run
        wrote it: a resume with other settings or data fails loudly instead of mixing two
        runs, and an unreadable file is a ValueError."""
        if self.path is None or not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors alike: the file is damaged
            raise ValueError(f"cannot resume: {self.path} is not a readable checkpoint ({first_line(exc)})") from exc
        keys = ("step", "fingerprint", "params", "optimizer", "rng")
        if not isinstance(state, dict) or any(key not in state for key in keys) or not isinstance(state["fingerprint"], dict):
            raise ValueError(f"cannot resume: {self.path} is not a checkpoint of alter.train (it lacks {list(keys)})")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"cannot resume from {self.path}: it was written by a different run "
                f"({_differences(state['fingerprint'], self.fingerprint)}); start again without resume"
            )
        return state

    def restore(self, state: dict, model, names: list[str], optimizer) -> int:
        """Copy a :meth:`read` state into the named parameters of ``model``, the optimizer and
        RNG (before an engine wraps them); returns its step."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in names:
                params[name].copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        return state["step"]


def _full_state(model, names: list[str], engine) -> dict:
    """The named parameters of ``model`` as full tensors (gathered when sharded)."""
    if engine is None:
        params = dict(model.named_parameters())
        return {name: params[name] for name in names}
    return engine.full_state(model, names)


def _differences(saved: dict, current: dict, prefix: str = "") -> str:
    """``key: saved -> current`` for each differing key of two run fingerprints."""
    parts = []
    for key in sorted(set(saved) | set(current), key=str):
        have, want = saved.get(key), current.get(key)
        if isinstance(have, dict) and isinstance(want, dict):
            parts += [_differences(have, want, f"{prefix}{key}.")] if have != want else []
        elif have != want:
            parts.append(f"{prefix}{key}: {have!r} -> {want!r}")
    return ", ".join(parts)


def _save_result(model, tokenizer, output_dir: str, method, args: dict, state: dict | None) -> None:
    """The adapter (or model), tokenizer and run record, written together: staged in a
    temporary sibling directory and moved in only when all are complete. ``state``: the
    model's full tensors when its own are shards."""
    with staged_directory(output_dir) as staging:
        method.save(model, staging, state)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, RUN_ARGS_FILE), "w") as f:
            json.dump(args, f, indent=2)
