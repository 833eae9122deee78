"""Backend availability reflects what can actually run: triton builds its kernels for the
CPU interpreter or for the GPU when alter_kernels is imported (when ``@triton.jit`` runs),
and its interpreter reads ``TRITON_INTERPRET`` again while it runs, so a later change of
the variable leaves triton unavailable on the CPU with a reason, instead of reported
available and failing inside triton. Each case runs in a fresh Python (this process
imported alter_kernels with TRITON_INTERPRET=1, see conftest)."""
import os
import subprocess
import sys

import pytest

from alter_kernels._dispatch import triton_import_error

pytestmark = pytest.mark.skipif(triton_import_error() is not None, reason="triton is not installed")

_PRELUDE = """
import os
import torch
import alter_kernels as ak

def assert_triton_unavailable(call, reason):
    assert reason in (ak.available_backends("cpu")["triton"] or ""), ak.available_backends("cpu")
    try:
        call()
    except ak.BackendUnavailable as exc:
        assert reason in str(exc), exc
    else:
        raise AssertionError(f"triton ran where it cannot: {reason}")
"""

_SET_AFTER_IMPORT = """
os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were built for the GPU
late = "set after alter_kernels was imported"
assert_triton_unavailable(lambda: ak.tsallis_entropy(torch.randn(3, 5), 2.0, backend="triton"), late)
os.environ["ALTER_BACKEND"] = "triton"
assert_triton_unavailable(
    lambda: ak.inverted_hinge_loss(torch.randn(3, 5), torch.tensor([0, 1, 2]), 2.0, 1.0), late
)
print("ok")
"""

_UNSET_AFTER_IMPORT = """
del os.environ["TRITON_INTERPRET"]  # the interpreter reads it while it runs, and fails without it
unset = "unset after alter_kernels was imported"
assert_triton_unavailable(lambda: ak.tsallis_entropy(torch.randn(3, 5), 2.0, backend="triton"), unset)
os.environ["TRITON_INTERPRET"] = "1"  # set again: the interpreted kernels run
logits = torch.randn(4, 7)
torch.testing.assert_close(
    ak.tsallis_entropy(logits, 2.0, backend="triton"), ak.tsallis_entropy(logits, 2.0, backend="eager")
)
print("ok")
"""


@pytest.mark.parametrize(
    "script,interpret_at_import", [(_SET_AFTER_IMPORT, None), (_UNSET_AFTER_IMPORT, "1")], ids=["set", "unset"]
)
def test_triton_availability_when_interpret_changes_after_import(script, interpret_at_import):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ALTER_BACKEND", "ALTER_TEST_CUDA")}
    if interpret_at_import is not None:
        env["TRITON_INTERPRET"] = interpret_at_import
    done = subprocess.run(
        [sys.executable, "-c", _PRELUDE + script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
