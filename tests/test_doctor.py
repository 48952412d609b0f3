"""doctor: the CPU's matrix units and what each CPU back end and precision gains there."""

from __future__ import annotations

from memexport.doctor import cpu_advice, environment_report
from memexport.runtime.cpu import cpu_units, parse_cpuinfo


def advice(cpuinfo: str) -> dict[tuple[str, str], str]:
    return {(a["backend"], a["precision"]): a["expect"] for a in cpu_advice(parse_cpuinfo(cpuinfo))}


def test_advice_follows_the_matrix_units():
    amx = advice("model name\t: Xeon\nflags\t\t: avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n")
    zen4 = advice("model name\t: EPYC\nflags\t\t: avx512f avx512_vnni avx512_bf16\n")
    old = advice("model name\t: Xeon E5\nflags\t\t: avx2\n")
    assert amx[("openvino", "bf16")].startswith("3x or more: AMX-BF16") and "do not use AMX" in amx[("onnxruntime", "int8")]
    assert zen4[("openvino", "bf16")].startswith("~1.3x") and zen4[("openvino", "int8")].startswith("~2.5x expected: VNNI")
    assert old[("openvino", "bf16")].startswith("refused: no BF16 unit") and old[("onnxruntime", "int8")].startswith("little")
    assert all(a[("onnxruntime", "fp32")].startswith("1x") for a in (amx, zen4, old))


def test_report_names_this_cpu_and_its_units():
    report = environment_report()["cpu"]
    assert report["matrix_units"] == list(cpu_units().flags) and report["kind"] == cpu_units().kind
    assert {(a["backend"], a["precision"]) for a in report["advice"]} >= {("openvino", "bf16"), ("onnxruntime", "fp32")}
