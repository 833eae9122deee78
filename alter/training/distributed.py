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
    """The process group, wrapping and collectives of a run, from ``accelerate`` (and
    torch's ``fully_shard`` for FSDP2).

    ``mode``: ``"ddp"``; ``"fsdp2"``: torch's ``fully_shard``, with each adapted layer's
    frozen base linear, each adapted layer's adapters (A, B, router: one dtype, fp32
    gradient reduction) and each decoder layer their own units (accelerate 1.16 applies
    its FSDP plugin on GPUs only: on CPU processes it silently runs DDP instead, so
    ``fully_shard`` is called here, on the process group accelerate formed); None: what
    ``accelerate launch``'s config says (DDP, FSDP or DeepSpeed; DDP under ``torchrun``).
    """

    def __init__(self, mode: str | None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        if mode is None and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            # accelerate launch with an FSDP config: alter shards the model itself.
            if os.environ.get("FSDP_VERSION", "1") != "2":
                raise ValueError("alter unlearn supports FSDP version 2 only "
                                 "(fsdp_version: 2 in the accelerate config)")
            mode = "fsdp2"
        self.mode = mode
        # Every parameter gets a gradient in every backward (the adapter methods' frozen
        # forwards give zeros, alter.adapters.frozen_adapters), and a step may run several
        # forwards before its one backward: DDP must not look for unused parameters.
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
        # cpu: accelerate forms a gloo group of CPU processes only when told to.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
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
        """(the model to call, the optimizer to step): DDP-wrapped, or sharded in place."""
        if self.mode != "fsdp2":
            return self.accelerator.prepare(model, optimizer)
        names = {id(p): name for name, p in model.named_parameters()}
        _fully_shard(model)
        # fully_shard swapped every parameter for a sharded one: the same groups, on those.
        params = dict(model.named_parameters())
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [params[names[id(p)]] for p in group["params"]]} for group in optimizer.param_groups]
        return model, type(optimizer)(groups)  # each group carries its settings

    def full_state_dict(self, model) -> dict | None:
        """FSDP2: ``model.state_dict()`` with full (gathered) CPU tensors, on every process
        (a collective); None when the model's own tensors are full (DDP)."""
        if self.mode != "fsdp2":
            return None
        from torch.distributed.tensor import DTensor

        return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
                for name, t in model.state_dict().items()}

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
        from torch.distributed.tensor import DTensor

        params = dict(model.named_parameters())
        full = {}
        for name in names:
            param = params[name].detach()
            full[name] = (param.full_tensor() if isinstance(param, DTensor) else param).cpu()
        return full

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()


def _fully_shard(model) -> None:
    """FSDP2 units, innermost first: each adapted layer's frozen base linear, then the
    layer itself (its adapters: one dtype, gradients reduced in fp32), each decoder layer
    (``model.model.layers``), the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from alter.adapters import alter_layers

    fp32_reduce = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in alter_layers(model).values():
        fully_shard(layer.base_layer)
        fully_shard(layer, mp_policy=fp32_reduce)
    for block in getattr(getattr(model, "model", None), "layers", []):
        fully_shard(block)
    fully_shard(model)
