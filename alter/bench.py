"""``alter bench``: runs the benchmark harness of a source checkout,
``benchmarks/harness.py`` beside the package (the harness and its cases live there, with
the pytest-benchmark suite they run; a wheel does not ship them).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "benchmarks" / "harness.py"


def main(argv: list[str]) -> int:
    """Run ``benchmarks/harness.py`` with ``argv`` (its flags; ``--help`` lists them) in a
    new process; its exit status, or 2 with a one-line message when there is no harness."""
    if not HARNESS.is_file():
        print(f"alter bench: no benchmark harness at {HARNESS}: alter bench runs from a source checkout "
              "(git clone, then pip install -e '.[bench]')", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(HARNESS), *argv])
