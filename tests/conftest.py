"""Test setup. Triton kernels run in the CPU interpreter unless ALTER_TEST_CUDA=1
(benchmarks/gpu_check.sh sets it to run the same tests on a GPU). TRITON_INTERPRET must
be set before triton is imported, so this happens before any project import."""
import os

if os.environ.get("ALTER_TEST_CUDA", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from alter.data import qa_texts, tofu_mini  # noqa: E402
from alter.tiny import build_tokenizer, tiny_llama  # noqa: E402
from alter_kernels._dispatch import unavailable_reason  # noqa: E402


def test_devices() -> list[str]:
    """Devices the kernel tests run on: the CPU always, CUDA under ALTER_TEST_CUDA=1."""
    if os.environ.get("ALTER_TEST_CUDA", "0") == "1":
        return ["cuda"]
    return ["cpu"]


test_devices.__test__ = False  # a helper, not a test, although its name starts with test_


def require_backend(backend: str, device: str) -> None:
    """Skip (with the reason) when a backend cannot run here, e.g. cpp on a GPU-less build."""
    why = unavailable_reason(backend, torch.device(device))
    if why:
        pytest.skip(f"{backend} on {device}: {why}")


# One thread per test process: the ops here are small, xdist already runs one worker per
# core, and extra threads on an oversubscribed CPU make tiny-model tests 10-100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A tiny tofu_mini and a one-layer Llama for the method tests (a module's own ``data`` or
# ``tokenizer`` fixture takes precedence).
@pytest.fixture(scope="module")
def data():
    return tofu_mini(num_authors=4, facts_per_author=2, forget_fraction=0.5, seed=2)


@pytest.fixture(scope="module")
def tokenizer(data):
    return build_tokenizer(qa_texts(data))


def small_model(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48,
                      max_position_embeddings=64, seed=3)
