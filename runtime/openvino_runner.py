"""The OpenVINO runner: memexport's ONNX artifacts (or OpenVINO IR) on the CPU, FP32 exact or BF16.

OpenVINO computes in BF16 by default on CPUs with a BF16 unit (AMX, AVX512-BF16), which
silently changes scores. This runner always states the precision: FP32 forces
``INFERENCE_PRECISION_HINT=f32`` and checks that the compiled model kept it; BF16 is asked
for explicitly (``OpenVinoOptions(precision="bf16")``) and refused on CPUs without a BF16
unit, where OpenVINO would emulate it. INT8 artifacts (Q/DQ) run their INT8 layers in INT8
whatever the precision, and the rest at the precision asked for; when that is not the precision
their calibration guard verified (an IR verified with BF16, on a CPU without a BF16 unit), the
runner says so in one line (``unverified``) and its scores are recorded as ``int8-unverified``.

``openvino`` is imported only when a runner activates, through :func:`memexport.core.optional.require`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from memexport.core.errors import ArtifactError, BackendUnavailableError, UsageError
from memexport.core.optional import require
from memexport.runtime.base import UNVERIFIED_SUFFIX, Runner, RunnerOptions
from memexport.runtime.cpu import CpuUnits, cpu_units
from memexport.runtime.integrity import check_external_data_location, check_model_present, check_onnx, external_data_locations
from memexport.runtime.ir_integrity import check_openvino_ir
from memexport.runtime.metadata import METADATA_KEY, metadata_from_map
from memexport.core.spec import MODELS

PRECISIONS = ("fp32", "bf16")
HINTS = {"fp32": "f32", "bf16": "bf16"}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# ``extra.inference_precision`` as calibration records it (OpenVINO's names) -> the runner's names.
VERIFIED_PRECISIONS = {"bf16": "bf16", "f32": "fp32", "fp32": "fp32"}
# Static-shape models kept compiled at once: a folder job needs two (its batch size and the last,
# shorter batch); an app that alternates more sizes recompiles (about 1.5 s for ResMem) instead of
# holding another copy of the weights.
STATIC_SHAPES_KEPT = 2


@dataclass(frozen=True)
class OpenVinoOptions:
    """OpenVINO runner options.

    Attributes:
        precision: ``"fp32"`` (exact: ``INFERENCE_PRECISION_HINT=f32``) or ``"bf16"`` (AMX or
            AVX512-BF16 only) for the layers the artifact keeps in floating point (default ``None``:
            ``fp32``, except for an INT8 artifact whose calibration guard passed with its
            floating-point layers in BF16 (``extra.inference_precision``): that artifact runs as it
            was verified, in BF16 where the CPU has a BF16 unit and in FP32 otherwise; a run outside the
            verified precision is marked: :attr:`Runner.unverified`, precision ``int8-unverified``).
        performance_hint: ``"LATENCY"`` (one stream: all threads on each call) or ``"THROUGHPUT"``
            (several streams, for many concurrent callers) (default ``"LATENCY"``).
        num_streams: Parallel inference streams; 0 leaves the hint's choice (default 0).
        static_batch: Compile one static-shape model per batch size seen (at most
            :data:`STATIC_SHAPES_KEPT` at once) instead of running the dynamic-batch graph: OpenVINO
            picks faster CPU kernels for static shapes (ResMem BF16 at batch 16 on an AMX Xeon: about
            1.1-1.3x the dynamic graph's throughput; docs/openvino.md) (default ``True``). Ignored
            when :attr:`RunnerOptions.varying_batch` is set: the INT8 IR ran as fast on the dynamic
            graph on an AVX512-BF16 EPYC (28.6 vs 28.7 images/s at batch 16), and a server's varying
            batch sizes would otherwise recompile every other call.
    """

    precision: str | None = None
    performance_hint: str = "LATENCY"
    num_streams: int = 0
    static_batch: bool = True

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"OpenVINO precision {self.precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
        if self.performance_hint not in PERFORMANCE_HINTS:
            raise UsageError(f"OpenVINO performance hint {self.performance_hint!r} is unknown; choose one of {', '.join(PERFORMANCE_HINTS)}")
        if self.num_streams < 0:
            raise UsageError(f"OpenVINO num_streams must be >= 0 (0: the hint's choice), got {self.num_streams}")


def bf16_refusal(units: CpuUnits, capabilities: Sequence[str]) -> str | None:
    """Why BF16 cannot run fast here, or ``None`` when it can.

    Args:
        units: The CPU's flags (:func:`memexport.runtime.cpu.cpu_units`).
        capabilities: OpenVINO's ``OPTIMIZATION_CAPABILITIES`` for the CPU device.
    """
    if units.known and not units.bf16:
        return f"this CPU ({units.model}) has no BF16 unit (neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo)"
    if "BF16" not in capabilities:
        return f"OpenVINO reports no BF16 support on this CPU (OPTIMIZATION_CAPABILITIES: {' '.join(capabilities) or 'none'})"
    return None


@lru_cache(maxsize=1)
def _core(ov: Any) -> Any:
    """One ``ov.Core`` per process, as OpenVINO recommends (each Core loads its own plugins)."""
    return ov.Core()


def _rt_metadata(model: Any) -> str | None:
    """The memexport metadata JSON OpenVINO read: ONNX ``metadata_props`` land under ``framework``."""
    for key in (["framework", METADATA_KEY], [METADATA_KEY]):
        if model.has_rt_info(key):
            return str(model.get_rt_info(key).astype(str))
    return None


def split_model(ov: Any, model: Any, names: Sequence[str]) -> tuple[Any, Any]:
    """Cut ``model`` at the tensors ``names``: a prefix that computes them from the model's inputs,
    and the rest, which takes them as extra inputs (same names) next to the original ones.

    Raises:
        ArtifactError: When a tensor is not in the graph (an export from another memexport version).
    """
    source, rest = model.clone(), model.clone()
    ports = [_port(source, name) for name in names]
    prefix = ov.Model(ports, source.get_parameters(), "fp32_prefix")
    cut = []
    for name in names:
        port = _port(rest, name)
        parameter = ov.opset13.parameter(port.get_partial_shape(), port.get_element_type(), name=name)
        parameter.output(0).set_names({name})
        for target in list(port.get_target_inputs()):
            target.replace_source_output(parameter.output(0))
        cut.append(parameter)
    return prefix, ov.Model(rest.get_results(), [*rest.get_parameters(), *cut], "rest")


def _port(model: Any, name: str) -> Any:
    for op in model.get_ordered_ops():
        for output in op.outputs():
            if name in output.get_names():
                return output
    raise ArtifactError(f"graph tensor {name!r}, where the model spec's FP32 part ends, is not in this model; re-export it with this memexport")


class _Staged:
    """A model compiled in two parts, run one after the other: an FP32 prefix, then the rest.

    It answers what the runner asks of a compiled model (``create_infer_request``, ``output``,
    ``input``, ``get_property``); properties are the rest's, where nearly all the work is.
    """

    def __init__(self, prefix: Any, rest: Any, names: Sequence[str]) -> None:
        self.prefix, self.rest, self.names = prefix, rest, tuple(names)

    def create_infer_request(self) -> "_StagedRequest":
        return _StagedRequest(self)

    def output(self, name: str) -> Any:
        return self.rest.output(name)

    def input(self, index: int) -> Any:
        return self.prefix.input(index)

    def get_property(self, key: str) -> Any:
        return self.rest.get_property(key)


class _StagedRequest:
    def __init__(self, staged: _Staged) -> None:
        self.staged = staged
        self.prefix = staged.prefix.create_infer_request()
        self.rest = staged.rest.create_infer_request()

    def infer(self, inputs: dict[str, np.ndarray]) -> Any:
        self.prefix.infer(inputs)
        for name in self.staged.names:  # hand the prefix's output tensors over without a copy
            self.rest.set_tensor(name, self.prefix.get_tensor(name))
        return self.rest.infer(inputs)


class OpenVinoRunner(Runner):
    """Runs a memexport ONNX artifact (or an OpenVINO IR ``.xml`` made from one) with OpenVINO on the CPU.

    ``infer`` is safe to call from several threads at once: an OpenVINO infer request serves one
    call at a time, so each call borrows a request from a pool (one per concurrent caller).

    Args:
        path: The ``.onnx`` artifact, or an ``.xml`` IR with its ``.bin`` beside it.
        options: Shared runner options (default :class:`RunnerOptions`); ``threads`` sets
            ``INFERENCE_NUM_THREADS``; ``device`` must be ``auto`` or ``cpu``.
        backend_options: :class:`OpenVinoOptions` (default ``None``: FP32, latency hint).
    """

    backend = "openvino"
    options_class = OpenVinoOptions

    def __init__(self, path: Path | str, options: RunnerOptions = RunnerOptions(), backend_options: OpenVinoOptions | None = None) -> None:
        super().__init__(path, options, backend_options)
        self._dynamic: Any = None  # the dynamic-batch compiled model (``static_batch=False`` only)
        self._model: Any = None
        self._ov: Any = None
        self._core: Any = None
        self._static: OrderedDict[int, Any] = OrderedDict()  # batch size -> compiled static-shape model, most recent last
        self._requests: dict[int, tuple[Any, list[Any]]] = {}  # batch size (0: dynamic) -> (compiled model, idle requests)
        # id -> [compiled model, calls running it]: a model evicted mid-call lives (and counts) until its last call returns.
        self._in_use: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        self._weight_bytes: int | None = None
        self._version = ""
        self._precision = "fp32"  # resolved on activation (see _float_precision)

    @classmethod
    def options_for_precision(cls, precision: str) -> OpenVinoOptions:
        """``fp32`` or ``bf16`` (see :class:`OpenVinoOptions`)."""
        return OpenVinoOptions(precision=precision)

    def activate(self) -> None:
        if self.options.device_kind == "cuda":
            raise UsageError(f"{self.path}: the OpenVINO back end runs on the CPU; use --device cpu, or --backend onnxruntime or tensorrt for a GPU")
        ov = require("openvino", extra="openvino", purpose="the OpenVINO back end")
        self._version = ov.get_version()
        self._check_file()
        core = _core(ov)
        model = self._read(core)
        why = bf16_refusal(cpu_units(), core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        self._precision = self._float_precision(why is None)
        self.unverified = self._outside_verified(why)
        if self.backend_options.precision == "bf16" and why is not None:
            raise UsageError(
                f"{self.path}: --precision bf16 refused: {why}, so OpenVINO would emulate BF16, slower than FP32; "
                "use --precision fp32 (exact), or an INT8 artifact from `memexport calibrate` for speed"
            )
        self._check_inputs(model)
        self._weight_bytes = sum(int(op.get_byte_size()) for op in model.get_ordered_ops() if op.get_type_name() == "Constant")
        self._ov, self._core, self._model = ov, core, model
        try:
            # Compile now, so a model OpenVINO cannot compile is refused on activation, not on the first
            # batch; with static shapes that is the batch-1 model (single images use it), not the
            # dynamic graph, which would only hold one more copy of the weights.
            if self._static_batch:
                self._compiled_for(1, hold=False)
            else:
                self._dynamic = self._compile(ov, core, model)
        except Exception:
            self._ov = self._core = self._model = None
            raise

    @property
    def _static_batch(self) -> bool:
        """Static shapes, unless the caller's batch sizes vary (a server), where each new size would recompile."""
        return self.backend_options.static_batch and not self.options.varying_batch

    @property
    def compiled(self) -> Any:
        """The compiled model serving calls: the dynamic one, or the most recently used static shape (``None`` when inactive)."""
        if not self._static_batch:
            return self._dynamic
        with self._lock:
            return next(reversed(self._static.values()), None)

    def _check_file(self) -> None:
        """Refuse a missing, empty, escaping or (with ``check_integrity``) tampered file before OpenVINO parses it."""
        assert self.path is not None
        check_model_present(self.path)
        if self.path.suffix.lower() == ".xml":
            if not self.path.with_suffix(".bin").is_file():
                raise ArtifactError(f"{self.path}: OpenVINO IR without its weights {self.path.with_suffix('.bin').name}; keep the .xml and .bin side by side")
            if self.options.check_integrity:
                check_openvino_ir(self.path)
            return
        check_external_data_location(self.path, external_data_locations(self.path))
        if self.options.check_integrity:
            check_onnx(self.path)

    def _read(self, core: Any) -> Any:
        """Parse the artifact and its memexport metadata (cross-checked against the bytes hashed)."""
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            first = " ".join(str(exc).split())[:200]
            raise ArtifactError(f"{self.path}: OpenVINO cannot read this model ({first}); re-export it or check that it is complete") from None
        value = _rt_metadata(model)
        if self.options.check_integrity and value is not None and self.path.suffix.lower() == ".onnx":
            check_onnx(self.path, parsed_value=value)  # cached: cross-checks the JSON hashed
        elif self.options.check_integrity and value is not None:
            check_openvino_ir(self.path, parsed_value=value)  # cached: cross-checks the JSON hashed
        self.metadata = metadata_from_map({METADATA_KEY: value} if value is not None else {}, self.path)
        return model

    def _check_inputs(self, model: Any) -> None:
        meta = self.metadata
        assert meta is not None
        inputs = {name: port for port in model.inputs for name in port.get_names()}
        outputs = {name for port in model.outputs for name in port.get_names()}
        if meta.input_name not in inputs or meta.output_name not in outputs:
            raise ArtifactError(
                f"{self.path}: metadata names input {meta.input_name!r} and output {meta.output_name!r} but the graph has "
                f"{sorted(inputs)} and {sorted(outputs)}; re-export it"
            )
        shape = inputs[meta.input_name].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        if dims[1:] != list(meta.input_shape):
            raise ArtifactError(f"{self.path}: graph input shape {shape} does not match metadata (N, {meta.input_shape}); re-export it")

    def _float_precision(self, bf16_fast: bool) -> str:
        """The precision of the floating-point layers: the one asked for, else the artifact's guarded one.

        An INT8 artifact from ``calibrate`` records the precision its guard verified outside INT8
        (``extra.inference_precision``); by default it runs that way where the CPU allows it.
        Everything else defaults to exact FP32.
        """
        if self.backend_options.precision is not None:
            return self.backend_options.precision
        assert self.metadata is not None
        guarded = self.metadata.precision == "int8" and self.metadata.extra.get("inference_precision") == "bf16"
        return "bf16" if guarded and bf16_fast else "fp32"

    def _outside_verified(self, why_no_bf16: str | None) -> str | None:
        """One line when an INT8 artifact's floating-point layers run in another precision than the one
        its calibration guard verified (``extra.inference_precision``), else ``None``: a path nobody measured."""
        assert self.metadata is not None
        verified = VERIFIED_PRECISIONS.get(str(self.metadata.extra.get("inference_precision")))
        if self.metadata.precision != "int8" or verified is None or verified == self._precision:
            return None
        if self.backend_options.precision is not None:
            cause = f"--precision {self._precision} was asked for"
        else:
            cause = why_no_bf16 or "this CPU cannot run BF16"
        return (
            f"warning: {self.path.name}: its calibration verified INT8 with {verified.upper()} outside the INT8 layers, "
            f"but they run in {self._precision.upper()} here because {cause}; these scores were never measured against "
            f"FP32 (marked int8{UNVERIFIED_SUFFIX}): check them with `memexport verify`, or score on a CPU with a BF16 unit"
        )

    def _fp32_until(self) -> tuple[str, ...]:
        """Where the FP32 part of a BF16 run ends: the model spec's ``bf16_fp32_until`` for a
        floating-point artifact computed in BF16 (an INT8 artifact runs as its guard verified it)."""
        assert self.metadata is not None
        spec = MODELS.get(self.metadata.model)
        if spec is None or self._precision != "bf16" or self.metadata.precision == "int8":
            return ()
        return spec.bf16_fp32_until

    def _compile(self, ov: Any, core: Any, model: Any) -> Any:
        """Compile at the resolved precision; BF16 with an FP32 prefix compiles the two parts apart."""
        names = self._fp32_until()
        if not names:
            return self._compile_part(ov, core, model, self._precision)
        try:
            prefix, rest = split_model(ov, model, names)
        except ArtifactError as exc:
            raise ArtifactError(f"{self.path}: {exc}") from None
        return _Staged(self._compile_part(ov, core, prefix, "fp32"), self._compile_part(ov, core, rest, "bf16"), names)

    def _compile_part(self, ov: Any, core: Any, model: Any, precision: str) -> Any:
        wanted = HINTS[precision]
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": wanted, "PERFORMANCE_HINT": self.backend_options.performance_hint}
        if self.options.threads:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        if self.backend_options.num_streams:
            config["NUM_STREAMS"] = self.backend_options.num_streams
        try:
            compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001
            first = " ".join(str(exc).split())[:200]
            raise ArtifactError(f"{self.path}: OpenVINO cannot compile this model for the CPU ({first}); re-export it") from None
        seen = compiled.get_property("INFERENCE_PRECISION_HINT")
        if seen != getattr(ov.Type, wanted):
            # Never let OpenVINO's own choice change scores the user did not ask to change.
            raise BackendUnavailableError(
                f"{self.path}: OpenVINO compiled with inference precision {seen.get_type_name()} instead of {wanted}; "
                "upgrade openvino or use --backend onnxruntime"
            )
        return compiled

    def _compiled_for(self, batch_size: int, hold: bool = True) -> Any:
        """The model that runs a batch of ``batch_size``: its static-shape compilation, or the dynamic one.

        With ``hold``, the model is counted as in use (under the same lock that found it, so an eviction
        in between cannot hide it from :meth:`memory_bytes`) until :meth:`_release`.
        """
        if not self._static_batch:
            with self._lock:
                return self._hold(self._dynamic) if hold else self._dynamic
        with self._lock:
            compiled = self._static.get(batch_size)
            if compiled is not None:
                self._static.move_to_end(batch_size)
                return self._hold(compiled) if hold else compiled
        model = self._model.clone()
        model.reshape({model.input(self.metadata.input_name): [batch_size, *self.metadata.input_shape]})
        compiled = self._compile(self._ov, self._core, model)
        with self._lock:
            # Two threads may both have compiled this size; keep the first, so requests stay pooled.
            compiled = self._static.setdefault(batch_size, compiled)
            self._static.move_to_end(batch_size)
            while len(self._static) > STATIC_SHAPES_KEPT:
                evicted, _ = self._static.popitem(last=False)
                self._requests.pop(evicted, None)  # final: only a kept model's requests are ever pooled again
            return self._hold(compiled) if hold else compiled

    def _hold(self, compiled: Any) -> Any:
        """Count one more call running ``compiled`` (caller holds the lock)."""
        self._in_use.setdefault(id(compiled), [compiled, 0])[1] += 1
        return compiled

    def _release(self, compiled: Any) -> None:
        """One call is done with ``compiled`` (caller holds the lock); an evicted model is freed after its last."""
        entry = self._in_use.get(id(compiled))
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._in_use[id(compiled)]

    def _idle_requests(self, key: int, compiled: Any) -> list[Any] | None:
        """The pool of idle requests of ``compiled`` for ``key``, or ``None`` when ``compiled`` is no longer
        the model kept for it (evicted): its requests are then used once and dropped (caller holds the lock)."""
        current = self._static.get(key) if self._static_batch else self._dynamic
        if current is not compiled:
            return None
        owner, idle = self._requests.get(key, (None, []))
        if owner is not compiled:
            owner, idle = self._requests[key] = (compiled, [])
        return idle

    def deactivate(self) -> None:
        with self._lock:
            self._requests.clear()
            self._static.clear()
            self._in_use.clear()
        self._dynamic = self._model = self._core = self._ov = None

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def precision(self) -> str:
        """``int8`` for INT8 artifacts, else ``bf16`` when asked for, else the artifact's own precision."""
        if self.metadata is None:
            return "unknown"
        if self.metadata.precision == "int8" or self._precision == "fp32":
            return self.metadata.precision
        return self._precision

    def memory_bytes(self) -> int | None:
        """Weights the compiled models hold: the graph's constants (halved when computing in BF16) times
        the models compiled now: the dynamic one or each static shape kept, plus any evicted model a
        call is still running (an estimate)."""
        if self._model is None or self._weight_bytes is None:
            return None
        one = self._weight_bytes // 2 if self._precision == "bf16" else self._weight_bytes
        with self._lock:
            held = {id(compiled) for compiled in self._static.values()} | set(self._in_use)
            held |= {id(self._dynamic)} if self._dynamic is not None else set()
            return one * len(held)

    def describe(self) -> dict[str, Any]:
        facts = super().describe() | {"openvino": self._version, "cpu": cpu_units().label()}
        compiled = self.compiled
        if compiled is not None:
            for key in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS"):
                value = compiled.get_property(key)
                facts[key.lower()] = value.get_type_name() if key == "INFERENCE_PRECISION_HINT" else str(value)
            if isinstance(compiled, _Staged):
                facts["fp32_until"] = list(compiled.names)
        return facts

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        assert self.metadata is not None and self._model is not None
        compiled = self._compiled_for(len(batch))  # held until released below
        key = len(batch) if self._static_batch else 0
        request = None
        try:
            with self._lock:
                idle = self._idle_requests(key, compiled)
                request = idle.pop() if idle else compiled.create_infer_request()
            result = request.infer({self.metadata.input_name: batch})
            return np.array(result[compiled.output(self.metadata.output_name)], dtype=np.float32, copy=True)
        finally:
            with self._lock:
                idle = self._idle_requests(key, compiled)
                if idle is not None and request is not None:  # kept: pool the request; evicted: drop it with the model
                    idle.append(request)
                self._release(compiled)
