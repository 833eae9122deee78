"""Optional triton import: the package works without it (eager and cpp backends).

Op modules define their kernels under ``if triton is not None:``."""
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs, macOS
    triton = None
    tl = None
