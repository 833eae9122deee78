"""Offline compile report: every Triton kernel of ``alter_kernels`` compiled for a GPU
architecture on a machine without one, at the benchmark shapes, through the project's
own launchers, with registers, spills, shared memory and SASS size per kernel.

    python benchmarks/compile_report.py --arch 90 80 --out compile_out

How: a fake Triton driver reports the target (sm_90a or sm_80) and every
``JITFunction.run`` is turned into a warm-up (compile, no launch). The launchers then run
on CPU tensors of the real shapes, so that the argument specializations (== 1, % 16,
pointer alignment) are those of a real launch. Big inputs are ``torch.empty``: the kernels
never run, so their pages are never touched and a [16384, 128256] bf16 logits tensor costs
no memory. Registers come from ``cuobjdump -res-usage``, spills from the ptxas log (a fresh
Triton cache per run, so ptxas always runs), the SASS from ``cuobjdump -sass``. For the row
kernels (a loop over the vocabulary) the report also counts the SASS instructions of the
main loop (the largest backward branch) and divides them by the elements each thread
handles per iteration. Each launch also gets the CTAs per SM that fit (registers, shared
memory, warps) and the waves its grid takes on the arch's reference GPU (H100/H200: 132
SMs, A100: 108): an estimate of tail waves, not a measurement.

Writes OUT/compile_report.json (a list of records {kernel, case, arch, num_warps,
num_stages, registers, spills, shared_bytes, sass_instructions, ...}, ``error`` when a
compile failed) and prints a table. Exits 1 when a compile failed, a kernel spills or
uses more than --max-registers registers (168: three CTAs of 4 warps, or 1.5 of 8 warps,
per SM).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (90, 80)  # Hopper (H100/H200: sm_90a), Ampere (A100: sm_80)
# Per SM of the reference GPU of each arch (H100/H200 SXM, A100 SXM): SMs, registers,
# shared memory per SM (bytes), most warps and CTAs; for the occupancy and wave estimate.
SM = {90: dict(count=132, registers=65536, shared=233472, warps=64, ctas=32),
      80: dict(count=108, registers=65536, shared=167936, warps=64, ctas=32)}
MAX_REGISTERS = 168
LOGITS_SHAPE = (16384, 128256)  # entropy / IHL: 16k tokens of Llama-3's vocabulary
ASYM_LORA_SHAPES = (  # label, k, d; r 8, N 8, top-3 (Llama-3-8B projections)
    ("MLP up/gate", 4096, 14336),
    ("attn q/o", 4096, 4096),
)
ASYM_LORA_TOKENS = (8192, 1024, 32, 1)
ROUTE_TOKENS = (8192, 1024, 32, 1)
GATED_TOKENS = (16, 4, 1)  # the fused inference adapter: decode-sized calls
R, NUM_EXPERTS, TOP_K = 8, 8, 3


# ----------------------------------------------------------------------------------
# compile everything for one arch (a worker process: the driver and caches are global)
# ----------------------------------------------------------------------------------


class _Recorder:
    """Turns every Triton launch into a compile and records it under the current case."""

    def __init__(self):
        self.case = "?"
        self.launches = []  # (kernel name, constexpr kwargs, compiled kernel or None, error, ptxas log)

    def install(self, arch: int) -> None:
        import triton  # noqa: F401  (imported after TRITON_CACHE_DIR is set)
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        class FakeDriver:
            def get_current_target(self):
                return GPUTarget("cuda", arch, 32)

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

        driver.set_active(FakeDriver())
        real_run = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the ptxas log
                    kernel, error = real_run(fn, *args, grid=grid, warmup=True, **kwargs), None
            except Exception as exc:  # a compile failure is a result, recorded
                kernel, error = None, f"{type(exc).__name__}: {str(exc)[:2000]}"
            kwargs["grid"] = grid
            recorder.launches.append((fn.fn.__name__, dict(kwargs), kernel, error, log.getvalue(), recorder.case))
            return kernel

        JITFunction.run = run


def _entropy_cases(rec: _Recorder) -> None:
    import torch

    entropy = importlib.import_module("alter_kernels.entropy")

    T, V = LOGITS_SHAPE
    logits = torch.empty(T, V, dtype=torch.bfloat16)
    chunk = logits[: entropy.default_chunk_size(V)]  # the chunk fused_linear_entropy hands the kernels
    for q in (1.2, 1.0):
        cases = ((f"entropy [{T}, {V}] bf16", logits), (f"fused_linear_entropy chunk [{chunk.shape[0]}, {V}] bf16", chunk))
        for name, rows in cases:
            rec.case = f"{name} q={q}"
            ent, *row_stats = entropy._entropy_forward_triton(rows, q)
            entropy._entropy_backward_triton(torch.empty_like(ent), rows, ent, *row_stats, q)
        for rows in (1, 32):  # decode: the split-V forward
            rec.case = f"entropy split-V [{rows}, {V}] bf16 q={q}"
            entropy._entropy_forward_triton(logits[:rows], q)


def _ihl_cases(rec: _Recorder) -> None:
    import torch

    ihl = importlib.import_module("alter_kernels.ihl")

    T, V = LOGITS_SHAPE
    logits = torch.empty(T, V, dtype=torch.bfloat16)
    labels = torch.zeros(T, dtype=torch.long)
    for q in (1.2, 1.0):
        rec.case = f"IHL [{T}, {V}] bf16 q={q}"
        loss, _, _, row_max, log_sum, runner_up = ihl._ihl_forward_triton(logits, labels, q, 1.2, 0.1, -100)
        ihl._ihl_backward_triton(torch.empty_like(loss), logits, labels, row_max, log_sum, runner_up, -100)


def _token_losses_cases(rec: _Recorder) -> None:
    import torch

    token_losses = importlib.import_module("alter_kernels.token_losses")  # the module, not the op of that name

    T, V = LOGITS_SHAPE
    logits = torch.empty(T, V, dtype=torch.bfloat16)
    labels = torch.zeros(T, dtype=torch.long)
    for q in (1.2, 1.0):
        rec.case = f"token losses (NLL, IHL, entropy) [{T}, {V}] bf16 q={q}"
        loss, entropy, _, row_max, log_sum, power_sum, runner_up = token_losses._token_losses_forward_triton(
            logits, labels, q, 1.2, 0.1, -100)
        grad = torch.empty_like(loss)
        token_losses._token_losses_backward_triton(grad, grad, grad, logits, labels, entropy, row_max, log_sum,
                                                   power_sum, runner_up, q, -100)


def _route_cases(rec: _Recorder) -> None:
    import torch

    routing = importlib.import_module("alter_kernels.routing")

    for T in ROUTE_TOKENS:
        rec.case = f"route T={T} N={NUM_EXPERTS} top-{TOP_K}"
        logits = torch.randn(T, NUM_EXPERTS, requires_grad=True)
        weights, _ = routing._RouteTriton.apply(logits, torch.rand(T) * 3, 1.2, 0.8, 0.01, TOP_K, 1)
        weights.backward(torch.randn_like(weights))


def _asym_lora_cases(rec: _Recorder) -> None:
    import torch

    asym_lora = importlib.import_module("alter_kernels.asym_lora")  # the module, not the op of that name
    gen = torch.Generator().manual_seed(0)
    for label, k, d in ASYM_LORA_SHAPES:
        for T in ASYM_LORA_TOKENS:
            name = f"AsymLoRA {label} T={T} {k}->{d} r={R} N={NUM_EXPERTS} top-{TOP_K} bf16"
            x = torch.empty(T, k, dtype=torch.bfloat16).requires_grad_(True)
            A = torch.empty(R, k, dtype=torch.bfloat16).requires_grad_(True)
            B = torch.empty(NUM_EXPERTS, d, R, dtype=torch.bfloat16).requires_grad_(True)
            # real routes: the backward builds the dense gate from them on the CPU
            experts = torch.rand(T, NUM_EXPERTS, generator=gen).argsort(dim=1)[:, :TOP_K].to(torch.int32)
            weights = torch.rand(T, TOP_K, generator=gen).requires_grad_(True)
            rec.case = name + " into out"  # as AsymLoRALinear calls it: into the base output
            base = torch.empty(T, d, dtype=torch.bfloat16, requires_grad=True) * 1  # a non-leaf
            out = asym_lora.AsymLoRATriton.apply(x, A, B, weights, experts.contiguous(), 2.0, None, base)
            out.backward(torch.empty_like(out))
            rec.case = name + " new"
            with torch.no_grad():
                asym_lora.AsymLoRATriton.apply(x, A, B, weights, experts.contiguous(), 2.0, None, None)


def _gated_asym_lora_cases(rec: _Recorder) -> None:
    import torch

    gated = importlib.import_module("alter_kernels.gated_asym_lora")
    for label, k, d in ASYM_LORA_SHAPES:
        for T in GATED_TOKENS:
            rec.case = f"gated AsymLoRA (decode) {label} T={T} {k}->{d} r={R} N={NUM_EXPERTS} top-{TOP_K} bf16"
            x = torch.empty(T, k, dtype=torch.bfloat16)
            stacked = torch.empty(NUM_EXPERTS + R, k, dtype=torch.bfloat16)
            expand = torch.empty(NUM_EXPERTS * R, d, dtype=torch.bfloat16)
            out = torch.empty(T, d, dtype=torch.bfloat16)
            gated._launch_triton(out, x, stacked, torch.zeros(NUM_EXPERTS), torch.rand(T) * 3, expand, NUM_EXPERTS,
                                 1.2, 0.8, 0.01, TOP_K, 1, None)


CASES = {"entropy": _entropy_cases, "ihl": _ihl_cases, "token_losses": _token_losses_cases, "route": _route_cases,
         "asym_lora": _asym_lora_cases, "gated_asym_lora": _gated_asym_lora_cases}


def _gpu_like_launch_config(arch: int) -> None:
    """Make the launchers pick the target GPU's tiles, as on a real one (on CPU tensors
    they would pick the interpreter's)."""
    for module in ("alter_kernels.asym_lora", "alter_kernels.gated_asym_lora"):  # the modules, not the ops
        importlib.import_module(module)._gpu_arch = lambda device: arch


# ----------------------------------------------------------------------------------
# cubin analysis
# ----------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction in ``cuobjdump -sass`` output."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(_SASS_LINE.match, sass.splitlines()) if m]


def main_loop_instructions(instructions: list[tuple[int, str]]) -> int | None:
    """Instructions in the largest loop: from a backward branch's target to the branch."""
    addresses = [a for a, _ in instructions]
    best = None
    for i, (address, text) in enumerate(instructions):
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            start = addresses.index(int(m.group(1), 16)) if int(m.group(1), 16) in addresses else None
            if start is not None and (best is None or i - start + 1 > best):
                best = i - start + 1
    return best


def _analyse(kernel, ptxas_log: str, workdir: Path) -> dict:
    cubin = workdir / f"{kernel.hash}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log))
    if "bytes spill" not in ptxas_log:  # no ptxas log (the kernel came from a cache): local memory
        spills = int(re.search(r"(?:STACK|LOCAL):(\d+)", usage).group(1))
    instructions = sass_instructions(sass)
    return dict(
        registers=registers, spills=spills, shared_bytes=kernel.metadata.shared,
        sass_instructions=len(instructions), main_loop_instructions=main_loop_instructions(instructions),
    )


def occupancy(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """CTAs per SM that fit: registers (allocated per warp in units of 256), shared memory
    (1 KiB reserved per CTA), warps and CTAs per SM."""
    sm = SM[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = sm["registers"] // (per_warp * num_warps)
    by_shared = sm["shared"] // (shared_bytes + 1024)
    return max(0, min(by_registers, by_shared, sm["warps"] // num_warps, sm["ctas"]))


def waves(arch: int, grid, ctas_per_sm: int) -> float | None:
    """Grid size over what the GPU runs at once; a fraction past an integer is a tail wave."""
    if callable(grid) or not ctas_per_sm:
        return None
    programs = 1
    for n in grid:
        programs *= n
    return round(programs / (SM[arch]["count"] * ctas_per_sm), 2)


def compile_arch(arch: int, which: list[str]) -> list[dict]:
    """Compile every kernel of the chosen case groups for ``arch``; one record per launch."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ["TRITON_CACHE_DIR"] = cache
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
        rec = _Recorder()
        rec.install(arch)
        _gpu_like_launch_config(arch)
        import torch

        torch.set_num_threads(1)
        for name in which:
            try:
                CASES[name](rec)
            except Exception as exc:  # a launcher that no longer runs: a failed record, not a crash
                rec.launches.append((name, {}, None, f"launcher failed: {type(exc).__name__}: {exc}", "", rec.case))
        records, analysed = [], {}
        for kernel_name, kwargs, kernel, error, log, case in rec.launches:
            record = dict(kernel=kernel_name, case=case, arch=arch)
            if kernel is None:
                records.append({**record, "error": error})
                continue
            if kernel.hash not in analysed:
                analysed[kernel.hash] = _analyse(kernel, log, Path(cache))
            stats = dict(analysed[kernel.hash])
            meta = {k: str(v) for k, v in kwargs.items() if k[:1].isupper()}  # the constexprs
            per_thread = int(kwargs["BLOCK_V"]) // (32 * kernel.metadata.num_warps) if "BLOCK_V" in kwargs else None
            loop = stats.pop("main_loop_instructions")
            ctas = occupancy(arch, stats["registers"], kernel.metadata.num_warps, stats["shared_bytes"])
            records.append({
                **record, "num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages, **stats,
                "grid": None if callable(kwargs["grid"]) else list(kwargs["grid"]), "ctas_per_sm": ctas, "waves": waves(arch, kwargs["grid"], ctas),
                "main_loop_instructions": loop if per_thread else None,
                "instructions_per_element": round(loop / per_thread, 2) if per_thread and loop else None,
                "meta": meta, "hash": kernel.hash[:12],
            })
        return records


# ----------------------------------------------------------------------------------
# driver: one worker process per arch, table, limits
# ----------------------------------------------------------------------------------


def violations(records: list[dict], max_registers: int) -> list[str]:
    bad = []
    for r in records:
        where = f"sm_{r['arch']} {r['kernel']} ({r['case']})"
        if "error" in r:
            bad.append(f"{where}: compile failed: {r['error'][:300]}")
        elif r["spills"] > 0:
            bad.append(f"{where}: spills {r['spills']} bytes")
        elif r["registers"] > max_registers:
            bad.append(f"{where}: {r['registers']} registers > {max_registers}")
    return bad


def format_table(records: list[dict]) -> str:
    """One line per distinct compiled kernel and case (a kernel that several launches of a
    case share is listed once)."""
    header = ("arch", "kernel", "case", "warps", "stages", "regs", "spills", "smem", "SASS", "loop", "instr/elem",
              "CTAs/SM", "waves")
    rows, seen = [], set()
    for r in records:
        key = (r["arch"], r["kernel"], r["case"], r.get("hash"))
        if key in seen:
            continue
        seen.add(key)
        if "error" in r:
            rows.append((f"sm_{r['arch']}", r["kernel"], r["case"], "ERROR", r["error"][:60], *[""] * 8))
            continue
        rows.append((
            f"sm_{r['arch']}", r["kernel"], r["case"], r["num_warps"], r["num_stages"], r["registers"], r["spills"],
            r["shared_bytes"], r["sass_instructions"], r["main_loop_instructions"] or "",
            r["instructions_per_element"] or "", r["ctas_per_sm"], "" if r["waves"] is None else r["waves"],
        ))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--out", type=Path, required=True, help="directory for compile_report.json")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--max-registers", type=int, default=MAX_REGISTERS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one arch, JSON on stdout
    args = parser.parse_args(argv)
    if args.worker:
        json.dump(compile_arch(args.arch[0], args.cases), sys.stdout)
        return 0
    start = time.time()
    # one process per arch, in parallel: the Triton driver and its caches are process-global
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    workers = [
        subprocess.Popen([sys.executable, __file__, "--worker", "--arch", str(arch), "--out", str(args.out),
                          "--cases", *args.cases], stdout=subprocess.PIPE, env=env, text=True)
        for arch in args.arch
    ]
    records = []
    for arch, worker in zip(args.arch, workers):
        out, _ = worker.communicate()
        if worker.returncode != 0:
            print(f"compile_report: the sm_{arch} worker failed (exit {worker.returncode})", file=sys.stderr)
            return 1
        records += json.loads(out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_report.json").write_text(json.dumps(records, indent=1))
    print(format_table(records))
    bad = violations(records, args.max_registers)
    print(f"\n{len(records)} launches compiled for {', '.join(f'sm_{a}' for a in args.arch)} in "
          f"{time.time() - start:.0f} s; report: {args.out / 'compile_report.json'}")
    for line in bad:
        print("LIMIT:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
