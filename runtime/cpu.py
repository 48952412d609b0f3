"""The CPU's matrix units, read from ``/proc/cpuinfo``: what decides BF16 and INT8 speed on a CPU.

Back ends differ in which units they use: OpenVINO runs BF16 on AMX or AVX512-BF16 and INT8
on AMX or VNNI; ONNX Runtime's INT8 kernels use VNNI but not AMX, and it has no BF16 path.
Every bench record and every figure quoted names these flags, because the machines differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The flags that matter for inference speed, in the order reports list them.
MATRIX_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuUnits:
    """What this CPU offers for inference.

    Attributes:
        model: The CPU's model name (``"unknown"`` where /proc/cpuinfo is unreadable).
        flags: The :data:`MATRIX_FLAGS` present, in that order.
        known: Whether /proc/cpuinfo could be read at all (``False`` on macOS, Windows...).
    """

    model: str
    flags: tuple[str, ...]
    known: bool = True

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    @property
    def bf16(self) -> bool:
        """A BF16 unit: AMX-BF16 or AVX512-BF16."""
        return any(flag in self.flags for flag in BF16_FLAGS)

    @property
    def vnni(self) -> bool:
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags

    @property
    def kind(self) -> str:
        """One word for tables: ``amx``, ``avx512-bf16``, ``vnni``, ``avx512`` or ``basic``."""
        if self.amx:
            return "amx"
        if self.bf16:
            return "avx512-bf16"
        if self.vnni:
            return "vnni"
        return "avx512" if "avx512f" in self.flags else "basic"

    def label(self) -> str:
        """``"Intel Xeon ... (amx_bf16 amx_int8 ...)"`` for records and reports."""
        return f"{self.model} ({' '.join(self.flags) or 'no AMX/BF16/VNNI flags'})"


def parse_cpuinfo(text: str) -> CpuUnits:
    """:class:`CpuUnits` from the text of ``/proc/cpuinfo`` (first processor block)."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuUnits(model, tuple(f for f in MATRIX_FLAGS if f in flags), known=True)


@lru_cache(maxsize=1)
def cpu_units() -> CpuUnits:
    """This machine's :class:`CpuUnits` (read once per process)."""
    try:
        return parse_cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:
        import platform

        return CpuUnits(platform.processor() or "unknown", (), known=False)
