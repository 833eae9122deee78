"""benchmarks/compile_report.py: the SASS loop count and the CI limits (the compiles
themselves run in CI through `make compile-report`)."""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "compile_report", pathlib.Path(__file__).parent.parent / "benchmarks" / "compile_report.py"
)
compile_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compile_report)

SASS = """
        code for sm_90a
                Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
        /*0020*/                   FADD R3, R2, R2 ;
        /*0030*/                   FMUL R3, R3, R3 ;
        /*0040*/                   ISETP.GE.AND P0, PT, R3, 0x5, PT ;
        /*0050*/              @!P0 BRA 0x20 ;
        /*0060*/                   BRA 0x60;
        /*0070*/                   EXIT ;
"""


def test_main_loop_is_the_largest_backward_branch():
    instructions = compile_report.sass_instructions(SASS)
    assert len(instructions) == 8
    # 0x20..0x50: four instructions; the trailing self-branch at 0x60 is no loop
    assert compile_report.main_loop_instructions(instructions) == 4
    assert compile_report.main_loop_instructions(instructions[:5]) is None


def test_limits_flag_spills_registers_and_failed_compiles():
    ok = dict(kernel="k", case="c", arch=90, registers=168, spills=0)
    assert compile_report.violations([ok], 168) == []
    bad = compile_report.violations(
        [{**ok, "registers": 169}, {**ok, "spills": 8}, dict(kernel="k", case="c", arch=80, error="boom")], 168
    )
    assert [line.split(": ", 1)[1] for line in bad] == ["169 registers > 168", "spills 8 bytes", "compile failed: boom"]
