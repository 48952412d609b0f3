"""``--fast``: the fastest path that keeps the ranking, resolved from the artifact and this CPU alone.

No calibration and no timing run: the choice follows measurements taken once per CPU kind
(docs/throughput.md). The one place the rule lives, for ``predict``, ``bench`` and ``serve``.

=====================================  ==================================  ========
artifact                               CPU / machine                       resolves to
=====================================  ==================================  ========
FP32 ``.onnx`` or IR                   BF16 unit (AMX or AVX512-BF16) and  OpenVINO BF16 (Spearman 0.9999 vs FP32 on
                                       OpenVINO installed                  45 unseen photos), fast decode
FP32 ``.onnx``                         anything else (or ``--device cuda``) ONNX Runtime FP32 (exact; OpenVINO FP32 is
                                                                           0.90-0.99x of it), fast decode
INT8 artifact (``*.int8-*``)           any                                 its own back end and the precision its
                                                                           guard verified (int8), fast decode
TensorRT engine, FP16 artifact         any                                 its own back end and precision, fast decode
=====================================  ==================================  ========

Explicit ``--backend``, ``--precision`` and ``--decode`` override the matching part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memexport.core.optional import optional
from memexport.runtime.cpu import CpuUnits, cpu_units
from memexport.runtime.metadata import ENGINE_SUFFIXES
from memexport.runtime.peek import recorded_metadata, recorded_model
from memexport.runtime.registry import backend_for


@dataclass(frozen=True)
class FastPath:
    """What ``--fast`` resolved to.

    Attributes:
        backend: Back end name (``None``: the artifact's default by suffix).
        precision: Precision to ask the back end for (``None``: the artifact's own).
        decode: ``fast`` unless overridden.
        why: One line saying why, for the summary.
    """

    backend: str | None
    precision: str | None
    decode: str
    why: str

    def label(self, backend: str, precision: str) -> str:
        """``--fast: openvino bf16, fast decode (why)`` once the runner named what it computes."""
        return f"--fast: {backend} {precision}, {self.decode} decode ({self.why})"


def artifact_precision(model: Path | str) -> str | None:
    """The precision recorded in an ONNX artifact's or IR's memexport metadata, without loading it
    (``None``: unreadable or none recorded; a TensorRT engine's own sidecar decides for it)."""
    if Path(model).suffix.lower() in ENGINE_SUFFIXES:
        return None
    precision = (recorded_metadata(model) or {}).get("precision")
    return precision if isinstance(precision, str) else None


def resolve_fast(
    model: Path | str, backend: str | None = None, precision: str | None = None, decode: str | None = None,
    device: str = "auto", units: CpuUnits | None = None, openvino_installed: bool | None = None,
) -> FastPath:
    """The fastest faithful path for ``model`` here (see the module's table).

    Args:
        model: The artifact.
        backend: ``--backend`` given with ``--fast`` (overrides; default ``None``).
        precision: ``--precision`` given with ``--fast`` (overrides; default ``None``).
        decode: ``--decode`` given with ``--fast`` (overrides; default ``None``: ``fast``).
        device: ``--device``; ``cuda`` resolves to the exact back end on the GPU (default ``auto``).
        units: The CPU (default: this one's :func:`cpu_units`).
        openvino_installed: Whether OpenVINO imports (default: tried).
    """
    path = Path(model)
    units = units or cpu_units()
    chosen_backend, chosen_precision, why = _resolve(path, device, units, openvino_installed)
    if backend is not None and backend != chosen_backend:
        # Another back end named: its own exact default unless a precision is named too.
        chosen_backend, chosen_precision, why = backend, None, "--backend given"
    if precision is not None:
        chosen_precision, why = precision, why + "; --precision given"
    if decode is None and not _fast_decode_keeps_ranking(path):
        return FastPath(chosen_backend, chosen_precision, "exact", why + "; exact decoding: fast decoding moves this model's ranking (its spec)")
    return FastPath(chosen_backend, chosen_precision, decode or "fast", why + ("; --decode given" if decode else ""))


def _fast_decode_keeps_ranking(path: Path) -> bool:
    """Whether the artifact's model declares fast decoding within its decode tolerance (unknown models: yes)."""
    from memexport.core.spec import find_spec

    spec = find_spec(recorded_model(path) or "")
    return spec is None or spec.fast_decode


def shared_decode(paths: "list[FastPath]") -> str:
    """The one decode mode for models sharing their photos' decode: fast only where every model keeps its ranking under it."""
    return "exact" if any(p.decode == "exact" for p in paths) else "fast"


def _resolve(path: Path, device: str, units: CpuUnits, openvino_installed: bool | None) -> tuple[str | None, str | None, str]:
    suffix = path.suffix.lower()
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt", None, "a TensorRT engine computes its own precision"
    own = artifact_precision(path)
    if own == "int8":
        return backend_for(path), None, "an INT8 artifact: the precision its fidelity guard verified"
    if own not in (None, "fp32"):
        return backend_for(path), None, f"a {own} artifact computes its own precision"
    if device == "cuda":
        return backend_for(path), None, "on the GPU: the exact back end; decoding is the CPU's share"
    if openvino_installed is None:
        openvino_installed = optional("openvino") is not None
    if units.bf16 and openvino_installed:
        unit = "AMX" if units.amx else "AVX512-BF16"
        return "openvino", "bf16", f"this CPU has {unit} and OpenVINO is installed"
    if suffix == ".xml":
        return "openvino", None, "an OpenVINO IR without a BF16 unit here: exact FP32"
    reason = "no BF16 unit on this CPU" if not units.bf16 else "OpenVINO is not installed (pip install 'memexport[openvino]')"
    return "onnxruntime", None, f"{reason}: the fastest exact back end"
