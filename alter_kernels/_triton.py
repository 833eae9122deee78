"""Optional triton import: the package works without it (eager and cpp backends).

Op modules define their kernels under ``if triton is not None:``.

``INTERPRETED``: whether those kernels run in triton's CPU interpreter. ``@triton.jit``
decides when each kernel is defined, from ``TRITON_INTERPRET`` at that moment (when
alter_kernels is imported, right after this module), so a later change of the variable
does not change what the kernels are.
"""
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs, macOS
    triton = None
    tl = None

INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)
