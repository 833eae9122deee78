"""Running :func:`alter.unlearn` on several processes, on Hugging Face ``accelerate``.

The run is the single-process run with each global batch split over the processes:
every process prepares the same data, model patch and data order (all are functions of
the seed), takes its contiguous share of each step's batch, and the engine averages the
gradients (DDP) or reduce-scatters them into shards (FSDP2). The methods rescale their
token means (:meth:`alter.methods.base.Method.global_mean`) so that the averaged gradient
is the gradient of the mean over the global batch. Checkpoints and results are written
by the main process from full tensors, so a run resumes at any world size.

Launch with ``torchrun`` (``--distributed ddp|fsdp2``) or ``accelerate launch`` with a
config of ``configs/accelerate/`` (README, "Multiple GPUs").
"""
from __future__ import annotations

import os

import torch

DISTRIBUTED_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


def launched() -> bool:
    """True under a multi-process launcher (torchrun, accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or any(os.environ.get(k) == "true" for k in DISTRIBUTED_ENV)


class Engine:
    """The process group, wrapping and collectives of a run, all from ``accelerate``.

    ``mode``: ``"ddp"``, ``"fsdp2"`` (``fully_shard`` through accelerate's FSDP plugin,
    each decoder layer its own unit), or None: what ``accelerate launch``'s config says
    (DDP under plain ``torchrun``).
    """

    def __init__(self, mode: str | None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, FullyShardedDataParallelPlugin

        kwargs = {}
        if mode == "fsdp2":
            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
                state_dict_type="FULL_STATE_DICT")
        # The routing passes leave A and B without gradient: DDP must not wait for them.
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
        # Mixed precision stays the trainer's own autocast (the same as on one process).
        # cpu: accelerate forms a gloo group of CPU processes only when told to.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=handlers, **kwargs)
        state = self.accelerator.state
        self.world, self.rank = state.num_processes, state.process_index
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process

    def check_batches(self, batch_size: int, n_forget: int) -> None:
        """Every process gets at least one example of every batch, or a clear error."""
        last = n_forget % batch_size or batch_size
        if min(batch_size, last) < self.world:
            raise ValueError(
                f"batch_size {batch_size} over {self.world} processes: every process needs an example of every "
                f"batch (the last batch of an epoch of {n_forget} forget rows has {last}); use a batch_size that "
                f"is a multiple of {self.world} and at most {n_forget}, with no smaller last batch")

    def share(self, ids: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of a global batch's example indices."""
        return ids.tensor_split(self.world)[self.rank]

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def mean(self, logs: dict[str, float]) -> dict[str, float]:
        """Each loss averaged over processes (the logs of a step)."""
        values = torch.tensor(list(logs.values()), dtype=torch.float64, device=self.device)
        return dict(zip(logs, (self.reduce_sum(values) / self.world).tolist()))

    def full_state(self, model, names) -> dict:
        """Full (gathered) tensors of the named parameters, on CPU, on every process."""
        state = self.accelerator.get_state_dict(model, unwrap=True)
        return {name: state[name].detach().cpu() for name in names}

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()
