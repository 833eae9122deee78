"""The benchmark harness (benchmarks/harness.py and its cases) without benchmarking: the
ratios of the table, the CPU peak-memory measurement, and that each variant of the
model-level cases runs the backends its name says."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from alter_kernels._dispatch import unavailable_reason

# The harness is a script folder of the source checkout, not a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_budget import choose_cases  # noqa: E402
from harness import all_cases, cpu_peak_rss_supported, find_case, format_table, peak_rss_growth, summarize  # noqa: E402

CPU = torch.device("cpu")
MiB = 2**20


def _result(case, variant, index, median_s, peak_bytes, **extra):
    return dict(case=case, variant=variant, variant_index=index, median_s=median_s, peak_bytes=peak_bytes, **extra)


class _Case:
    def __init__(self, name):
        self.name = name


def test_the_budget_chooses_the_cases_that_fit_in_order_and_probes_only_unknown_ones():
    cases = [_Case(n) for n in ("a", "long", "b", "new", "c")]
    probed = []

    def estimate(case):
        probed.append(case.name)
        return 3.0

    costs = {"a": 4.0, "long": 50.0, "b": 2.0, "c": 2.5}
    chosen, left_out = choose_cases(cases, costs, 10.0, estimate)
    # a (4) + b (2) + new (3 estimated) fit in 10 s; long does not, and does not keep b and new out;
    # c (2.5) no longer fits.
    assert chosen == {"a": 4.0, "b": 2.0, "new": 3.0} and left_out == {"long": 50.0, "c": 2.5}
    assert probed == ["new"]
    chosen, left_out = choose_cases(cases, costs, 100.0, estimate)
    assert list(chosen) == ["a", "long", "b", "new", "c"] and left_out == {}


def test_summarize_ratios_against_the_baseline_of_each_case():
    results = [
        _result("op", "eager", 0, 0.030, 300 * MiB, bytes_moved=6e9),
        _result("op", "cpp", 1, 0.010, 100 * MiB, bytes_moved=6e9),
        _result("step", "eager", 0, 0.5, 0, tokens=1000),
        _result("step", "kernels", 1, 0.2, 10 * MiB, tokens=1000),
    ]
    rows = summarize(results, {"copy_bandwidth": 2e12, "bf16_matmul_flops": 1e15})
    op_eager, op_cpp, step_eager, step_kernels = rows
    assert op_eager["speedup"] == pytest.approx(1.0) and op_cpp["speedup"] == pytest.approx(3.0)
    assert op_cpp["memory_ratio"] == pytest.approx(1 / 3)
    # 6e9 bytes in 10 ms = 600 GB/s of a 2 TB/s ceiling
    assert op_cpp["roofline"] == pytest.approx(0.3)
    assert step_kernels["speedup"] == pytest.approx(2.5)
    assert step_kernels["tokens_per_s"] == pytest.approx(5000)
    assert step_kernels["memory_ratio"] is None  # a zero baseline peak gives no ratio
    assert op_eager["tokens_per_s"] is None


def test_roofline_is_the_binding_ceiling_over_the_time():
    # 1 GB at 2 TB/s = 0.5 ms, 1e13 FLOP at 1 PFLOP/s = 10 ms: the matmul binds
    rows = summarize([_result("layer", "linear", 0, 0.02, None, bytes_moved=1e9, flops=1e13)],
                     {"copy_bandwidth": 2e12, "bf16_matmul_flops": 1e15})
    assert rows[0]["roofline"] == pytest.approx(0.5)


def test_summarize_without_a_baseline_or_ceilings_gives_no_ratios():
    rows = summarize([_result("op", "cpp", 1, 0.01, 5 * MiB, bytes_moved=1e9)], {})
    assert rows[0]["speedup"] is None and rows[0]["memory_ratio"] is None and rows[0]["roofline"] is None


def test_format_table_lists_every_case_and_variant_with_its_ratios():
    results = [
        _result("tsallis_entropy fwd [7x13] float32", "eager", 0, 0.004, 3 * MiB),
        _result("tsallis_entropy fwd [7x13] float32", "cpp", 1, 0.001, None),
        _result("prefill [2x64]", "base", 0, 0.1, 2 * MiB, tokens=128),
    ]
    table = format_table(summarize(results, {}))
    lines = table.splitlines()
    assert lines[0] == "tsallis_entropy fwd [7x13] float32"
    cpp = next(line for line in lines if line.startswith("cpp"))
    assert cpp.split() == ["cpp", "1.000", "-", "4.00x", "-", "-", "-"]
    base = next(line for line in lines if line.startswith("base"))
    assert base.split() == ["base", "100.000", "2.0", "1.00x", "1.00", "1280", "-"]


@pytest.mark.skipif(not cpu_peak_rss_supported(), reason="resetting the peak RSS needs Linux /proc/self/clear_refs")
def test_peak_rss_growth_sees_a_temporary_and_only_it():
    # 48 MiB: above glibc's largest mmap threshold (32 MiB), so it is mapped and unmapped
    # even without the memory subprocess's MALLOC_MMAP_THRESHOLD_.
    size = 48 * MiB

    def temporary():
        torch.ones(size // 4).sum()

    grown = peak_rss_growth(temporary)
    # the kernel's RSS counters lag by a few pages per CPU; the interpreter may touch a few MiB more
    assert size - MiB <= grown < size + 8 * MiB
    assert peak_rss_growth(lambda: None) < 4 * MiB


def test_cases_have_unique_names_and_the_gpu_list_builds_without_a_gpu():
    for device in (CPU, torch.device("cuda")):
        for quick in (True, False):
            names = [c.name for c in all_cases(device, quick)]
            assert len(names) == len(set(names))
    llama_8b = find_case("ALTER train step Llama-3-8B x2 layers [4x1024]", torch.device("cuda"), False)
    assert llama_8b.tokens == 4096


@pytest.fixture
def backend_calls(monkeypatch):
    """Every (op, backend) the dispatcher picks while the test runs."""
    calls = []
    # by module path: the package re-exports the op asym_lora under its module's name
    for name in ("entropy", "ihl", "routing", "asym_lora", "gated_asym_lora", "token_losses"):
        module = importlib.import_module(f"alter_kernels.{name}")
        original = module.resolve_backend

        def recording(op, backend, device, implemented, _original=original):
            chosen = _original(op, backend, device, implemented)
            calls.append((op, chosen))
            return chosen

        monkeypatch.setattr(module, "resolve_backend", recording)
    return calls


def _run_once(case_name: str, variant: str, calls: list) -> None:
    """Build the case (the train step's build runs the trainer's base-model pass), then
    record the backends of one step only."""
    step = find_case(case_name, CPU, quick=True).build(variant, CPU)
    calls.clear()
    step()


TRAIN_STEP = "ALTER train step tiny Llama [2x64]"


def test_train_step_runs_the_trainers_own_step(monkeypatch):
    from alter.methods.base import Method

    calls = []
    real = Method.step
    monkeypatch.setattr(Method, "step", lambda self, *args: calls.append(args) or real(self, *args))
    find_case(TRAIN_STEP, CPU, quick=True).build("eager", CPU)()
    assert len(calls) == 1
    _, forget, retain = calls[0]
    assert forget["input_ids"].shape == retain["input_ids"].shape == (1, 64)


def test_step_cost_case_times_each_methods_own_step(monkeypatch):
    from alter.methods.base import Method

    runs = []
    real = Method.step
    monkeypatch.setattr(Method, "step",
                        lambda self, *args: runs.append((self.name, self.config.routing)) or real(self, *args))
    case = find_case("step cost, ALTER vs asym_lora tiny Llama [2x64]", CPU, quick=True)
    assert case.variants == ("asym_lora", "alter", "alter-token")  # the baseline first: ratios are ALTER's cost
    kept = []
    real_kept = Method.with_kept_tokens
    monkeypatch.setattr(Method, "with_kept_tokens",
                        lambda self, loss, logs, logits, forget: kept.append("keep_labels" in forget)
                        or real_kept(self, loss, logs, logits, forget))
    for variant in case.variants:
        case.build(variant, CPU)()
    # the defaults: the sequence route and the kept term, as unlearn runs them
    assert runs == [("asym_lora", "sequence"), ("alter", "sequence"), ("alter", "token")]
    assert kept == [True, True, True]


def test_train_step_eager_variant_runs_every_op_eagerly(backend_calls):
    _run_once(TRAIN_STEP, "eager", backend_calls)
    ops = {op for op, _ in backend_calls}
    # the trainer's step: cached entropy (no prepass); IHL, NLL and structural term in one op; layers, routers
    assert {"token_losses", "asym_lora", "route"} <= ops
    assert "fused_linear_entropy" not in ops
    assert {backend for _, backend in backend_calls} == {"eager"}


def test_train_step_kernels_variant_runs_the_logits_ops_in_the_extension(backend_calls):
    why = unavailable_reason("cpp", CPU)
    if why:
        pytest.skip(f"cpp on cpu: {why}")
    _run_once(TRAIN_STEP, "kernels", backend_calls)
    chosen = dict(backend_calls)
    assert chosen["token_losses"] == "cpp"
    # the layers take their dense path on the CPU (no grouped asym_lora, no route call)
    assert "asym_lora" not in chosen and "route" not in chosen


def test_prefill_gates_by_a_prepass_and_decode_by_lagged_entropy(backend_calls):
    prefill = find_case("prefill [2x64]", CPU, quick=True)
    prefill.build("eager", CPU)()
    ops = {op for op, _ in backend_calls}
    assert "fused_linear_entropy" in ops and "route" in ops and "tsallis_entropy" not in ops
    backend_calls.clear()
    decode = next(c for c in all_cases(CPU, True) if c.name.startswith("decode"))
    decode.build("eager", CPU)()
    # lagged: one prepass for the prompt, then each decoded token's gate comes from the
    # entropy of the last logits (tsallis_entropy) after every forward
    ops = [op for op, _ in backend_calls]
    assert ops.count("fused_linear_entropy") == 1
    assert ops.count("tsallis_entropy") == 8  # one per generated token (quick sizes: 8)


def test_the_sequence_route_cases_run_no_entropy_prepass(backend_calls):
    # an adapter as unlearn saves it: the route gates, so neither the prompt nor a decoded
    # token needs the base model's entropy (the lagged one of the last logits is kept)
    for name in ("prefill sequence route [2x64]", "decode sequence route 8 tokens x2 (prompt 16)"):
        backend_calls.clear()
        find_case(name, CPU, quick=True).build("eager", CPU)()
        ops = [op for op, _ in backend_calls]
        assert "fused_linear_entropy" not in ops and "route" not in ops, (name, ops)
        assert ops, name  # the layers ran their ops
