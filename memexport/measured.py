"""The speed measurements memexport quotes, in one table: each with its date, CPU, flags and page.

A CPU speed-up means nothing without the CPU it was measured on (two 2-core Xeons with the same
flags measured BF16 at 2.9x and 5.9x ONNX Runtime FP32), so ``doctor`` quotes only rows measured
on a CPU with the same matrix units as the one it runs on, each with its date and source page
under ``docs/measurements/``, and otherwise says none matches. ``memexport doctor --measure``
measures this machine instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from memexport.runtime.cpu import CpuUnits

XEON_AMX = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f")
EPYC_BF16 = ("avx512_bf16", "avx512_vnni", "avx512f")
EPYC_VNNI = ("avx512_vnni", "avx512f")


@dataclass(frozen=True)
class Measurement:
    """One path's speed against ONNX Runtime FP32 (batch 16) on one host and date.

    Attributes:
        date: ISO date of the run(s).
        cpu: The CPU's model name, as the bench records named it.
        flags: Its matrix-unit flags (:data:`memexport.runtime.cpu.MATRIX_FLAGS` order).
        backend: ``onnxruntime`` or ``openvino``.
        precision: What the path computes (``fp32``, ``bf16``, ``int8``).
        artifact: ``fp32 onnx``, ``int8-cpu`` (U8S8) or ``int8-openvino`` (the IR): one of ``doctor``'s CPU paths.
        low: The lowest ratio measured that day.
        high: The highest (equal to ``low`` for one run).
        page: The measurement page, ``docs/measurements/<date>-<cpu>.md``, with the command run.
        note: What else the figure depends on (runs, stem, peer measurement).
    """

    date: str
    cpu: str
    flags: tuple[str, ...]
    backend: str
    precision: str
    artifact: str
    low: float
    high: float
    page: str
    note: str = ""

    @property
    def units(self) -> CpuUnits:
        return CpuUnits(self.cpu, self.flags)

    def ratio(self) -> str:
        """``2.88x`` or ``2.70-3.21x``."""
        return f"{self.low:.2f}x" if self.low == self.high else f"{self.low:.2f}-{self.high:.2f}x"


# The hosts, by their page's name: docs/measurements/<name>.md holds the command and the full table.
HOSTS = {
    "2026-11-22-epyc-vnni": ("2026-11-22", "AMD EPYC", EPYC_VNNI),
    "2026-11-30-xeon-amx": ("2026-11-30", "Intel Xeon", XEON_AMX),
    "2026-12-04-xeon-amx": ("2026-12-04", "Intel Xeon", XEON_AMX),
    "2026-12-04-epyc-bf16": ("2026-12-04", "AMD EPYC", EPYC_BF16),
}
# From the measurement pages (each with its command); the EPYC with AVX512-BF16 rows also span a peer's
# bench run quoted in issue 19. Ratios to ONNX Runtime FP32 at batch 16: host, back end, precision, artifact, low, high, note.
ROWS = (
    ("2026-11-22-epyc-vnni", "onnxruntime", "int8", "int8-cpu", 2.99, 2.99, "one quiet bench run"),
    ("2026-11-30-xeon-amx", "openvino", "fp32", "fp32 onnx", 0.97, 0.97, "one run"),
    ("2026-11-30-xeon-amx", "openvino", "bf16", "fp32 onnx", 2.70, 3.21, "five runs; 2.70-2.88x with the stem in FP32"),
    ("2026-11-30-xeon-amx", "openvino", "int8", "int8-openvino", 4.62, 5.49, "three runs; BF16 outside INT8"),
    ("2026-11-30-xeon-amx", "onnxruntime", "int8", "int8-cpu", 2.44, 2.84, "four runs; ONNX Runtime's INT8 kernels use VNNI, not AMX"),
    ("2026-12-04-xeon-amx", "openvino", "fp32", "fp32 onnx", 0.98, 1.03, "three runs"),
    ("2026-12-04-xeon-amx", "openvino", "bf16", "fp32 onnx", 5.76, 5.93, "three runs; stem in FP32"),
    ("2026-12-04-xeon-amx", "openvino", "int8", "int8-openvino", 8.75, 9.14, "three runs; BF16 outside INT8"),
    ("2026-12-04-xeon-amx", "onnxruntime", "int8", "int8-cpu", 2.84, 2.89, "three runs"),
    ("2026-12-04-epyc-bf16", "openvino", "fp32", "fp32 onnx", 1.02, 1.02, "one run (6 rounds)"),
    ("2026-12-04-epyc-bf16", "openvino", "bf16", "fp32 onnx", 2.00, 2.05, "one run (6 rounds) and a peer's run quoted in issue 19"),
    ("2026-12-04-epyc-bf16", "openvino", "int8", "int8-openvino", 3.59, 3.61, "one run (6 rounds) and a peer's run quoted in issue 19; BF16 outside INT8"),
    ("2026-12-04-epyc-bf16", "onnxruntime", "int8", "int8-cpu", 3.01, 3.01, "one run (6 rounds)"),
)
MEASUREMENTS: tuple[Measurement, ...] = tuple(
    Measurement(*HOSTS[host], backend, precision, artifact, low, high, f"docs/measurements/{host}.md", note)
    for host, backend, precision, artifact, low, high, note in ROWS
)


def measured_like(units: CpuUnits, rows: tuple[Measurement, ...] = MEASUREMENTS) -> list[Measurement]:
    """The rows measured on a CPU with the same matrix units as ``units`` (same :attr:`CpuUnits.kind`)."""
    return [row for row in rows if row.units.kind == units.kind]
