"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: 5 steps of
``alter`` (under gradient checkpointing) and of ``grad_diff`` on the tiny model, results
into ``OUT/<method>``; under ``ddp`` also 3 steps of ``alter`` with a checkpoint into
``OUT/resume`` (resumed on one process by the test)."""
import sys

from test_distributed import METHOD_ARGS, build

from alter.train import unlearn

mode, out = sys.argv[1], sys.argv[2]
for method, kwargs in METHOD_ARGS.items():
    model, tokenizer, data = build()
    # alter under gradient checkpointing (the single-process run has none)
    unlearn(model, tokenizer, data["forget"], data["retain"], method=method, distributed=mode,
            output_dir=f"{out}/{method}", progress=False, gradient_checkpointing=method == "alter", **kwargs)
if mode == "ddp":
    model, tokenizer, data = build()
    unlearn(model, tokenizer, data["forget"], data["retain"], method="alter", distributed=mode,
            output_dir=f"{out}/resume", progress=False, save_every=3, **{**METHOD_ARGS["alter"], "max_steps": 3})
