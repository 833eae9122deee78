"""Two CPU processes (gloo) under torchrun, through accelerate: DDP and FSDP2 runs of
``alter`` and ``grad_diff`` give the single-process result of the same global batch, and
a checkpoint of the 2-process run resumes on one process to the uninterrupted result."""
import os
import socket
import subprocess
import sys
import warnings

import pytest
from safetensors.torch import load_file

from alter.config import AlterConfig
from alter.data import qa_texts, tofu_mini
from alter.tiny import build_tokenizer, tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))
# 5 steps on a global batch of 4: 2 examples a process; alter on the per-token routers with
# one router warm-up step, asym_lora on the default sequence route and forget tokens.
METHOD_ARGS = {
    "alter": dict(config=AlterConfig(r=2, num_experts=3, routing="token"), batch_size=4, max_steps=5,
                  router_warmup=1),
    "asym_lora": dict(config=AlterConfig(r=2, num_experts=3), batch_size=4, max_steps=5),
    "grad_diff": dict(batch_size=4, max_steps=5, lr=1e-3),
}
RTOL = 1e-4


def build():
    """The tiny model, tokenizer and data, the same in every process."""
    data = tofu_mini(num_authors=4, facts_per_author=2, forget_fraction=0.5, seed=2)
    tokenizer = build_tokenizer(qa_texts(data))
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                       max_position_embeddings=64, seed=3)
    return model, tokenizer, data


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(directory) -> dict:
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(directory, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(directory, name))


def _max_relative_diff(expected: dict, got: dict) -> float:
    """max over tensors of ||got - expected|| / ||expected||."""
    assert expected.keys() == got.keys()
    return max(((got[k].double() - expected[k].double()).norm() / expected[k].double().norm()).item()
               for k in expected)


def _single_process(method, out, **overrides):
    """(the saved weights, the steps run) of a one-process run."""
    from alter.train import unlearn

    model, tokenizer, data = build()
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "barely forgotten": 5 steps
        unlearn(model, tokenizer, data["forget"], data["retain"], method=method, output_dir=str(out),
                progress=False, callback=lambda step, logs: steps.append(step), **{**METHOD_ARGS[method], **overrides})
    return _weights(out), steps


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return {method: _single_process(method, root / method)[0] for method in METHOD_ARGS}


def _launch(mode, out):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), os.path.join(HERE, "_distributed_worker.py"), mode, str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_give_the_single_process_result(mode, single, tmp_path):
    _launch(mode, tmp_path)
    for method in METHOD_ARGS:
        diff = _max_relative_diff(single[method], _weights(tmp_path / method))
        print(f"{mode} {method}: max relative difference {diff:.2e}")
        assert diff < RTOL, (mode, method, diff)
    if mode == "ddp":
        # The 2-process checkpoint at step 3, resumed on one process to the end.
        resumed, steps = _single_process("alter", tmp_path / "resume", save_every=3, resume=True)
        assert steps == [4, 5, 6]  # 1 warm-up + 5 unlearning steps; the checkpoint at step 3
        diff = _max_relative_diff(single["alter"], resumed)
        print(f"ddp 3 steps -> 1 process 2 steps: max relative difference {diff:.2e}")
        assert diff < RTOL, diff


def test_a_batch_that_leaves_a_process_without_examples_is_refused():
    from alter.distributed import Engine

    engine = Engine.__new__(Engine)
    engine.world = 2
    with pytest.raises(ValueError, match="every process needs an example of every batch"):
        engine.check_batches(4, 9)  # the last batch of an epoch has 1 row
    engine.check_batches(4, 10)
