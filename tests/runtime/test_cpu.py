"""CPU matrix units from /proc/cpuinfo, and the BF16 decision built on them (no openvino needed)."""

from __future__ import annotations

from memexport.runtime.cpu import cpu_units, parse_cpuinfo
from memexport.runtime.openvino_runner import bf16_refusal

AMX = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni amx_bf16 amx_int8 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n"
ZEN4 = "model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f avx512_vnni avx512_bf16\n"
SKYLAKE = "model name\t: Intel Xeon Gold 6148\nflags\t\t: fpu avx512f\n"


def test_matrix_units_come_from_the_first_processor_block():
    amx, zen4, skylake = parse_cpuinfo(AMX), parse_cpuinfo(ZEN4), parse_cpuinfo(SKYLAKE)
    assert amx.flags == ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f") and amx.model == "Intel Xeon"
    assert (amx.kind, zen4.kind, skylake.kind) == ("amx", "avx512-bf16", "avx512")
    assert (amx.bf16, zen4.bf16, skylake.bf16) == (True, True, False)
    assert zen4.vnni and not skylake.vnni and not zen4.amx
    assert skylake.label() == "Intel Xeon Gold 6148 (avx512f)"


def test_this_machine_is_read():
    units = cpu_units()
    assert units.model and set(units.flags) <= {"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f"}


def test_bf16_refusal_reads_cpu_flags_and_openvino_capabilities():
    amx, zen4, skylake = parse_cpuinfo(AMX), parse_cpuinfo(ZEN4), parse_cpuinfo(SKYLAKE)
    assert bf16_refusal(amx, ["FP32", "BF16", "INT8"]) is None and bf16_refusal(zen4, ["FP32", "BF16"]) is None
    assert "no BF16 unit" in bf16_refusal(skylake, ["FP32", "BF16"])
    assert "OPTIMIZATION_CAPABILITIES: FP32 INT8" in bf16_refusal(amx, ["FP32", "INT8"])


