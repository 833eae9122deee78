"""The benchmark harness: ``python benchmarks/harness.py`` (``make bench``; ``alter bench``
from a source checkout) runs the pytest-benchmark suite ``test_bench.py`` over the cases of
``bench_cases.py`` and ``bench_models.py`` with ``pytest --benchmark-json`` and turns its
results into one table, printed first (pytest-benchmark's own tables are off): for each case, each variant's median time, peak memory, and both
as ratios to the case's baseline (the eager path, the frozen ``nn.Linear`` alone, or the
unpatched model) measured in the same run.

``--budget SECONDS`` runs only the cases that fit in that time (``bench_budget.py``).

Peak memory is what one call needs above what existed before it (its inputs, the model,
the optimizer state), outputs and gradients included, measured after a warm-up call:

- CUDA: the caching allocator's peak statistics, in the benchmark process;
- CPU: the peak resident set size (``VmHWM``) of a fresh subprocess per case, reset with
  ``/proc/self/clear_refs`` just before the call. The subprocess sets
  ``MALLOC_MMAP_THRESHOLD_`` so that freed blocks go back to the OS instead of staying
  resident in the heap, where a later temporary would reuse them unseen; the timed
  process keeps glibc's defaults.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_cases import BenchCase, Step, bench_device, op_cases, synchronize, variant_unavailable
from bench_budget import COSTS_FILE, budget_line, choose_cases, matches, probe_cost, read_costs, record_costs
from bench_models import model_cases

# Set by ``alter bench --budget``: the time (epoch seconds) after which no case starts (a
# safety net: the budget first chooses the cases that fit, see choose_cases), and the
# names of the chosen cases (JSON list; conftest.py deselects the others).
DEADLINE_ENV = "ALTER_BENCH_DEADLINE"
CASES_ENV = "ALTER_BENCH_CASES"
# glibc serves allocations of at least this many bytes with mmap, returned on free
# (set in the CPU memory subprocess only).
MEMORY_CHILD_MMAP_THRESHOLD = 64 * 1024


def all_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    return op_cases(device, quick) + model_cases(device, quick)


def find_case(name: str, device: torch.device, quick: bool) -> BenchCase:
    for case in all_cases(device, quick):
        if case.name == name:
            return case
    raise KeyError(f"no benchmark case named {name!r}")


# ----------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------


def cuda_peak_memory_bytes(case: BenchCase, variant: str, device: torch.device) -> int:
    """Peak memory one warm call of ``variant`` allocates above what existed before it."""
    step = case.build(variant, device)
    step()  # warm-up: compiles kernels, creates optimizer state
    synchronize(device)
    gc.collect()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def cpu_peak_rss_supported() -> bool:
    """Whether this OS lets a process reset its peak RSS (Linux ``clear_refs``)."""
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def cpu_peak_memory_bytes(case: BenchCase, quick: bool) -> dict[str, int | None]:
    """Peak RSS growth of one warm call of each variant of ``case``, measured in a fresh
    subprocess (see the module docstring); None for variants that cannot run or when
    the OS cannot reset the peak."""
    if not cpu_peak_rss_supported():
        return dict.fromkeys(case.variants)
    cmd = [sys.executable, __file__, "_peak-rss", case.name] + (["--quick"] if quick else [])
    env = {**os.environ, "ALTER_BENCH_DEVICE": "cpu", "MALLOC_MMAP_THRESHOLD_": str(MEMORY_CHILD_MMAP_THRESHOLD)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the memory subprocess for {case.name!r} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def peak_rss_growth(step: Step) -> int:
    """Peak RSS growth of one warm call of ``step`` (Linux): warm up, reset the peak RSS
    to the current RSS, run once, and return peak - before."""
    step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    before = _proc_status_bytes("VmRSS")
    step()
    return max(0, _proc_status_bytes("VmHWM") - before)


def _peak_rss_child(name: str, quick: bool) -> dict[str, int | None]:
    """In the memory subprocess: :func:`peak_rss_growth` of each variant of a case."""
    device = torch.device("cpu")
    case = find_case(name, device, quick)
    peaks: dict[str, int | None] = {}
    for variant in case.variants:
        if variant_unavailable(variant, device):
            peaks[variant] = None
            continue
        peaks[variant] = peak_rss_growth(case.build(variant, device))
        gc.collect()  # the variant's inputs are gone before the next one is built
    return peaks


# ----------------------------------------------------------------------------------
# ceilings (GPU roofline)
# ----------------------------------------------------------------------------------


def measure_ceilings(device: torch.device) -> dict:
    """Device copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s), measured now."""
    if device.type != "cuda":
        return {}
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    bandwidth = 2 * src.numel() / (ms * 1e-3)
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return {"copy_bandwidth": bandwidth, "bf16_matmul_flops": 2 * n**3 / (ms * 1e-3)}


# ----------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------


def summarize(results: list[dict], ceilings: dict) -> list[dict]:
    """Table rows, in the order of ``results``, with ratios to each case's baseline.

    results: one dict per (case, variant) with ``case``, ``variant``, ``variant_index``
    (0 = the baseline), ``median_s``, ``peak_bytes`` (or None) and optionally ``tokens``,
    ``bytes_moved``, ``flops``. Added: ``speedup`` = baseline median / median and
    ``memory_ratio`` = peak / baseline peak (None when the baseline was not run or has no
    peak), ``tokens_per_s``, and ``roofline`` when the ceilings are known: the roofline
    time of the op (its bytes over the copy bandwidth or its FLOPs over the matmul rate,
    whichever is longer) over the measured time.
    """
    baselines = {r["case"]: r for r in results if r["variant_index"] == 0}
    rows = []
    for r in results:
        row = dict(r)
        base = baselines.get(r["case"])
        row["speedup"] = base["median_s"] / r["median_s"] if base else None
        row["memory_ratio"] = (
            r["peak_bytes"] / base["peak_bytes"]
            if base and base["peak_bytes"] and r["peak_bytes"] is not None
            else None
        )
        row["tokens_per_s"] = r["tokens"] / r["median_s"] if r.get("tokens") else None
        bounds = []
        if r.get("bytes_moved") and ceilings.get("copy_bandwidth"):
            bounds.append(r["bytes_moved"] / ceilings["copy_bandwidth"])
        if r.get("flops") and ceilings.get("bf16_matmul_flops"):
            bounds.append(r["flops"] / ceilings["bf16_matmul_flops"])
        row["roofline"] = max(bounds) / r["median_s"] if bounds else None
        rows.append(row)
    return rows


def _mib(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    return f"{mib:.1f}" if mib >= 0.1 or nbytes == 0 else "<0.1"


def _optional(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`summarize` as a text table, one block per case."""
    columns = ["variant", "median ms", "peak MiB", "speedup", "mem ratio", "tok/s", "roofline"]
    cells = []
    for r in rows:
        cells.append([
            r["variant"],
            f"{1e3 * r['median_s']:.3f}",
            _mib(r["peak_bytes"]),
            _optional(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
            _optional(r["memory_ratio"], ".2f"),
            _optional(r["tokens_per_s"], ".0f"),
            "-" if r["roofline"] is None else f"{100 * r['roofline']:.0f}%",
        ])
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    header = line(columns)
    lines = []
    previous = None
    for r, row in zip(rows, cells):
        if r["case"] != previous:
            lines += ["", r["case"], header, "-" * len(header)]
            previous = r["case"]
        lines.append(line(row))
    lines += [
        "",
        "speedup = baseline median / variant median; mem ratio = variant peak / baseline peak, in the same run.",
        "baseline = the first variant of each case: eager (ops, train step), linear (the frozen nn.Linear alone, "
        "AsymLoRA layer) or base (the unpatched model, inference).",
        "peak = memory one warm call needs above what existed before it, outputs and gradients included "
        "(a fwd+bwd of [T, V] logits writes a [T, V] gradient).",
        "kernels = the backend the dispatcher picks for each op on this device; roofline = the op's roofline "
        "time (its bytes over the measured copy bandwidth or its FLOPs over the measured bf16 matmul rate, "
        "whichever is longer) over its median; for the AsymLoRA layer, the frozen matmul's alone.",
    ]
    return "\n".join(lines[1:])


def plot(rows: list[dict], path: Path) -> bool:
    """Bar chart of every row's speedup over its case's baseline; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup"] is not None]
    labels = [f"{r['case'][:64]} :: {r['variant']}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, max(3, 0.28 * len(rows))))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows],
            color=["tab:gray" if r["variant_index"] == 0 else "tab:blue" for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the case's baseline (gray), same run; log scale")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _run_description(data: dict, device: torch.device, ceilings: dict, quick: bool) -> dict:
    """Where and when the results were measured, for the table header and results.json."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        cpu = data.get("machine_info", {}).get("cpu", {})
        machine = (f"{cpu.get('brand_raw', 'cpu')}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"load average {os.getloadavg()[0]:.1f} at the end")
    commit = data.get("commit_info", {})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "machine": machine,
        "torch": torch.__version__,
        "commit": (commit.get("id") or "unknown") + (" (dirty)" if commit.get("dirty") else ""),
        "sizes": "quick" if quick else "full",
        "ceilings": ceilings,
    }


def _header(info: dict) -> str:
    text = (f"{info['date']}  device: {info['device']} ({info['machine']})  torch {info['torch']}  "
            f"commit {info['commit']}  sizes: {info['sizes']}")
    ceilings = info["ceilings"]
    if ceilings:
        text += (f"\nceilings: copy {ceilings['copy_bandwidth'] / 1e9:.0f} GB/s, "
                 f"bf16 matmul {ceilings['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alter bench",
        description="Time every ALTER op and model-level step against the eager path and print one table "
        "(runs the pytest-benchmark suite in benchmarks/; the same as python benchmarks/harness.py).",
    )
    parser.add_argument("--out", default="bench_out",
                        help="folder for results.json, table.txt, bench.png and the cases' costs (default: bench_out)")
    parser.add_argument("--quick", action="store_true", help="CI sizes and few rounds, CPU (default: off)")
    parser.add_argument("-k", default=None, help="only cases matching this pytest -k expression (default: all)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="run the cases that fit in this many seconds, chosen by their cost in earlier runs "
                             f"into --out ({COSTS_FILE}) or by a quick probe (default: none, every case)")
    args = parser.parse_args(argv)

    try:
        import pytest
        import pytest_benchmark  # noqa: F401 (the plugin of --benchmark-json)
    except ImportError as exc:
        print(f"alter bench: {exc.name} is not installed: pip install 'alter-kernels[bench]'", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "pytest-benchmark.json"
    raw.unlink(missing_ok=True)
    os.environ["ALTER_BENCH_QUICK"] = "1" if args.quick else "0"
    device = bench_device()
    chosen_line = None
    if args.budget is not None:
        os.environ[DEADLINE_ENV] = str(time.time() + args.budget)
        # -k narrows the cases first (pytest's own matching would see only the chosen ones).
        cases = [c for c in all_cases(device, args.quick) if not args.k or matches(args.k, c)]
        chosen, left_out = choose_cases(cases, read_costs(out, device, args.quick), args.budget,
                                        lambda case: probe_cost(case, device, args.quick))
        os.environ[CASES_ENV] = json.dumps(list(chosen))
        chosen_line = budget_line(chosen, left_out, args.budget)
        print(f"alter bench: {chosen_line}", flush=True)
    # Quiet: pytest-benchmark's own wide tables would come before this harness's table.
    pytest_args = [str(Path(__file__).resolve().parent), "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw}",
                   "--benchmark-quiet"]
    if args.k:
        pytest_args += ["-k", args.k]
    code = int(pytest.main(pytest_args))
    if code != 0:
        print(f"alter bench: the benchmark suite did not complete (pytest exit {code})", file=sys.stderr)
    if not raw.exists():
        return code or 1
    # An interrupted or partly failed run still writes what it measured.
    data = json.loads(raw.read_text())
    record_costs(out, device, args.quick, data["benchmarks"])
    results = [{**b["extra_info"], "median_s": b["stats"]["median"]} for b in data["benchmarks"] if "case" in b["extra_info"]]
    ceilings = next((b["extra_info"]["ceilings"] for b in data["benchmarks"] if "ceilings" in b["extra_info"]), {})
    rows = summarize(results, ceilings)
    info = _run_description(data, device, ceilings, args.quick)
    if chosen_line:
        info["budget"] = chosen_line
    problems = []
    if code != 0:
        problems.append(f"pytest exit {code}: only the cases that finished are listed")
    missing = [name for name in chosen if name not in {r["case"] for r in results}] if args.budget is not None else []
    if missing:
        problems.append(f"the time budget of {args.budget:.0f} s ran out before {len(missing)} of the chosen cases "
                        "started (their estimates were short): " + ", ".join(missing))
    if problems:
        info["incomplete"] = "; ".join(problems)
    text = (_header(info) + (f"\n{chosen_line}" if chosen_line else "")
            + "".join(f"\nINCOMPLETE: {p}" for p in problems) + "\n\n" + format_table(rows))
    print(text)
    (out / "table.txt").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({**info, "rows": rows}, indent=2))
    written = [out / "results.json", out / "table.txt"]
    if plot(rows, out / "bench.png"):
        written.append(out / "bench.png")
    else:
        print("alter bench: matplotlib is not installed (pip install 'alter-kernels[plot]'); no bench.png",
              file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)))
    return code


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_peak-rss":
        print(json.dumps(_peak_rss_child(sys.argv[2], "--quick" in sys.argv[3:])))
    else:
        sys.exit(main())
