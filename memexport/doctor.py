"""``doctor``: what this machine can run, which CPU paths its matrix units offer, and how fast they are here.

Speed is never assumed: ``doctor`` quotes only measurements taken on a CPU with the same matrix
units, each with its date, CPU and page (:mod:`memexport.measured`), and ``doctor --measure``
times this machine's paths with ``memexport bench``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from memexport.core.optional import optional
from memexport.runtime.cpu import CpuUnits, cpu_units


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report() -> dict[str, Any]:
    """Versions, execution providers, TensorRT, CUDA devices and precision advice."""
    from memexport.core.version import __version__
    from memexport.runtime.gpu import list_gpus, precision_advice

    report: dict[str, Any] = {
        "memexport": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnxruntime_gpu": _version("onnxruntime-gpu"),
        "tensorrt": None,
    }
    onnxruntime = optional("onnxruntime")
    report["onnxruntime_providers"] = onnxruntime.get_available_providers() if onnxruntime is not None else []
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            report["tensorrt"] = tensorrt.__version__
        except Exception as exc:  # noqa: BLE001 - a broken install is worth reporting, not raising
            report["tensorrt"] = f"broken ({type(exc).__name__}: {exc})"
    report["openvino"] = _version("openvino")
    report["cpu"] = cpu_report(cpu_units())
    gpus = list_gpus()
    report["gpus"] = [
        {
            "index": g.index, "name": g.name, "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}",
            "memory_gib": round(g.total_memory / 1024**3, 2), "advice": precision_advice(g.compute_capability, report["tensorrt"]),
        }
        for g in gpus
    ]
    if not gpus:
        report["advice"] = "no CUDA GPU visible: run on the CPU; the cpu lines above say which paths this CPU offers"
    return report


NO_MEASUREMENT = "no measurement on a CPU like this one; run `memexport doctor --measure`"
# The files each CPU path reads (`memexport export` and `memexport calibrate` name them so).
ARTIFACT_FILES = {"fp32 onnx": "the FP32 .onnx", "int8-cpu": "*.int8-cpu.onnx", "int8-openvino": "*.int8-openvino.xml"}


@dataclass(frozen=True)
class CpuPath:
    """One CPU back end, precision and artifact, and whether this CPU's matrix units offer it.

    Attributes:
        backend: ``onnxruntime`` or ``openvino``.
        precision: What it computes: ``fp32``, ``bf16`` or ``int8``.
        artifact: ``fp32 onnx``, ``int8-cpu`` (U8S8, ONNX Runtime) or ``int8-openvino`` (the IR).
        offered: Whether the CPU has the unit the path needs (BF16 is refused without one).
        uses: The unit it runs on here, or why it is not offered.
    """

    backend: str
    precision: str
    artifact: str
    offered: bool
    uses: str


def cpu_paths(units: CpuUnits) -> list[CpuPath]:
    """The CPU paths and which of them ``units`` offer: facts about the flags, no speed figures."""
    bf16_unit = "AMX-BF16" if "amx_bf16" in units.flags else "AVX512-BF16"
    int8_unit = "AMX-INT8" if "amx_int8" in units.flags else "VNNI"
    return [
        CpuPath("onnxruntime", "fp32", "fp32 onnx", True, "FP32: the exact reference and the default"),
        CpuPath("openvino", "fp32", "fp32 onnx", True, "FP32: exact, the same scores as ONNX Runtime FP32"),
        CpuPath("openvino", "bf16", "fp32 onnx", units.bf16,
                bf16_unit if units.bf16 else "no BF16 unit (AMX-BF16 or AVX512-BF16), so OpenVINO refuses BF16"),
        CpuPath("openvino", "int8", "int8-openvino", units.amx or units.vnni,
                int8_unit if units.amx or units.vnni else "no INT8 unit (AMX-INT8 or VNNI): INT8 would run on plain SIMD"),
        CpuPath("onnxruntime", "int8", "int8-cpu", units.vnni,
                "VNNI (ONNX Runtime's INT8 kernels do not use AMX)" if units.vnni else "no VNNI: ONNX Runtime's INT8 kernels need it"),
    ]


def path_report(path: CpuPath, units: CpuUnits) -> dict[str, Any]:
    """A path with the measurements taken on a CPU with the same matrix units (date, CPU, flags, page)."""
    from memexport.measured import measured_like

    rows = [m for m in measured_like(units) if (m.backend, m.precision, m.artifact) == (path.backend, path.precision, path.artifact)]
    measured = [{"ratio_to_onnxruntime_fp32": m.ratio(), "date": m.date, "cpu": m.cpu, "flags": list(m.flags), "page": m.page, "note": m.note}
                for m in rows]
    return {"backend": path.backend, "precision": path.precision, "artifact": path.artifact, "reads": ARTIFACT_FILES[path.artifact],
            "offered": path.offered, "uses": path.uses, "measured": measured}


def cpu_report(units: CpuUnits) -> dict[str, Any]:
    """The CPU's matrix units, OpenVINO's view of them, the paths they offer and the measurements on a CPU like it."""
    from memexport.measured import measured_like

    report: dict[str, Any] = {"model": units.model, "matrix_units": list(units.flags), "kind": units.kind}
    openvino = optional("openvino")
    if openvino is not None:
        try:
            report["openvino_capabilities"] = list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        except Exception as exc:  # noqa: BLE001 - a broken install is worth reporting, not raising
            report["openvino_capabilities"] = f"broken ({type(exc).__name__}: {exc})"
    report["paths"] = [path_report(path, units) for path in cpu_paths(units)]
    if not measured_like(units):
        report["measurements"] = NO_MEASUREMENT
    return report


# --- doctor --measure: this machine's paths, timed by memexport bench ---

DEFAULT_MODEL = Path("artifacts/resmem.onnx")


@dataclass(frozen=True)
class MeasureOptions:
    """A short timed run: about 30 s for ResMem's three FP32-artifact paths on a 2-core CPU.

    Attributes:
        batch_size: Images per call (default 16, the batch the quoted figures use).
        iterations: Timed calls per path (default 3).
        warmup: Untimed calls first (default 1).
        rounds: The paths of one artifact group are loaded at once and timed in turn, one call each
            per round (default 3), so a busy machine's drift hits them alike (see ``BenchOptions.rounds``).
    """

    batch_size: int = 16
    iterations: int = 3
    warmup: int = 1
    rounds: int = 3


@dataclass(frozen=True)
class BenchGroup:
    """Artifacts timed together with the same back ends and precisions (empty: the artifact's own)."""

    artifacts: tuple[Path, ...]
    backends: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()


def measure_plan(artifacts: Sequence[Path], units: CpuUnits, have_openvino: bool,
                 note: Callable[[str], None] = lambda _: None) -> list[BenchGroup]:
    """The paths this CPU has, for each artifact.

    An FP32 artifact runs on ONNX Runtime and, with the ``openvino`` extra, on OpenVINO in FP32 and,
    where the CPU has a BF16 unit, BF16. INT8 (and FP16) artifacts, told by their names
    (``*.int8-cpu.onnx``, ``*.int8-openvino.xml``...), run once on the back end their suffix picks.
    An IR without the ``openvino`` extra is left out with a note.
    """
    from memexport.plot import artifact_kind

    fp32, own = [], []
    for artifact in map(Path, artifacts):
        if artifact.suffix.lower() == ".xml" and not have_openvino:
            note(f"skipped {artifact}: the OpenVINO IR needs the openvino extra (pip install 'memexport[openvino]')")
        elif artifact_kind(str(artifact)) == "ONNX":
            fp32.append(artifact)
        else:
            own.append(artifact)
    backends = ("onnxruntime", "openvino") if have_openvino else ("onnxruntime",)
    precisions = ("fp32", "bf16") if have_openvino and units.bf16 else ("fp32",)
    if fp32 and not have_openvino:
        note("OpenVINO paths left out: pip install 'memexport[openvino]' to time them")
    groups = [BenchGroup(tuple(fp32), backends, precisions)] if fp32 else []
    return groups + ([BenchGroup(tuple(own))] if own else [])


@dataclass(frozen=True)
class MeasureResult:
    """``doctor --measure``: the bench records, their ratios to ONNX Runtime FP32, and the run's time."""

    units: CpuUnits
    records: list = field(default_factory=list)
    seconds: float = 0.0
    options: MeasureOptions = MeasureOptions()

    def rows(self) -> list[dict[str, Any]]:
        """One row per path: label, images/s and ratio to ONNX Runtime FP32 (``None`` without it in the run)."""
        from memexport.plot import plot_points

        return [{"path": p.label, "images_per_s": p.images_per_s, "ratio_to_onnxruntime_fp32": p.ratio, "reference": p.reference}
                for p in plot_points(self.records)]


def measure_this_cpu(artifacts: Sequence[Path] = (), options: MeasureOptions = MeasureOptions(),
                     progress: Callable[[str], None] = lambda _: None) -> MeasureResult:
    """Time the paths this CPU has (:func:`measure_plan`) with :func:`memexport.bench.bench_artifacts`.

    Args:
        artifacts: Artifacts to time (default: ``artifacts/resmem.onnx``); add INT8 ones to time them too.
        options: See :class:`MeasureOptions`.
        progress: Called with a short line before each path and for each path left out.

    Raises:
        UsageError: An artifact that does not exist.
    """
    from memexport.bench import BenchOptions, bench_artifacts
    from memexport.core.errors import UsageError

    artifacts = [Path(a) for a in artifacts] or [DEFAULT_MODEL]
    missing = [a for a in artifacts if not a.exists()]
    if missing:
        fix = "run `make demo` or `memexport export resmem -o artifacts/resmem.onnx`" if missing[0] == DEFAULT_MODEL else "check the path"
        raise UsageError(f"{missing[0]}: no such artifact to measure; pass -m PATH or {fix}")
    units = cpu_units()
    started = time.perf_counter()
    records = []
    for group in measure_plan(artifacts, units, optional("openvino") is not None, progress):
        bench = BenchOptions(batch_sizes=(options.batch_size,), iterations=options.iterations, warmup=options.warmup,
                             torch_baseline=False, backends=group.backends, precisions=group.precisions, rounds=options.rounds)
        records += bench_artifacts(group.artifacts, bench, progress)
    return MeasureResult(units, records, time.perf_counter() - started, options)
