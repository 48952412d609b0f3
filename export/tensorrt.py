"""``engine_from_onnx``: build a TensorRT engine (plan + JSON sidecar) from an exported ONNX model.

What differs between TensorRT 8.6, 10.x and 11.x is decided in :mod:`memexport.export.trt_version`
(which also imports ``tensorrt``, lazily); the sidecar is :class:`memexport.runtime.engine_sidecar.EngineSidecar`;
export -> calibrate -> build from a model name is :func:`memexport.pipeline.build`.

On 8.6 and 10 the builder flags work, and INT8 can come from a TensorRT calibration
cache, read by a calibrator that only replays the cache (it never sees images).
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from memexport.core.version import __version__
from memexport.runtime import gpu as gpu_facts
from memexport.core.cachedir import default_cache_dir
from memexport.core.errors import ArtifactError, BackendUnavailableError, CalibrationError, UsageError
from memexport.export.trt_version import TrtFeatures, device_memory_size, enum_member, network_flags, tensorrt, trt_features
from memexport.runtime.gpu import GpuInfo, precision_advice, require_tensorrt_supports
from memexport.core.optional import require
from memexport.runtime import budget
from memexport.runtime.engine_sidecar import EngineSidecar, io_bytes, sha256_bytes, sha256_path, sidecar_path
from memexport.runtime.metadata import ArtifactMetadata
from memexport.core.spec import PRECISIONS

CALIBRATION_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
CALIBRATORS = {"EntropyCalibration2": "IInt8EntropyCalibrator2", "MinMaxCalibration": "IInt8MinMaxCalibrator"}


@dataclass(frozen=True)
class BuildOptions:
    """How to build an engine.

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8`` (default ``fp16``, the design card's example).
        min_batch: Smallest batch of the optimisation profile (default 1).
        opt_batch: Batch TensorRT tunes kernels for (default 8).
        max_batch: Largest batch of the profile (default 32); the runner splits larger batches.
        vram_budget_bytes: VRAM budget (default 11 GiB, a GTX 1080 Ti); the workspace limit is
            derived from it and the build is refused when the estimate exceeds it.
        workspace_bytes: Builder workspace limit (default ``None``: derived from the budget).
        calibration_cache: TensorRT calibration cache for implicit INT8 on 8.6/10 (default ``None``).
        calibration_images: Folder to calibrate from on the way (``--calib DIR``; default ``None``).
        timing_cache: Timing cache file, read before and written after each build (default
            ``None``: ``<cache_dir>/tensorrt/timing-<TensorRT version>-<sm>.cache``).
        cache_dir: Where exported ONNX files and timing caches are kept (default ``None``:
            :func:`default_cache_dir`).
        device: CUDA device ordinal to build on (default 0).
    """

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    vram_budget_bytes: int = budget.DEFAULT_BUDGET_BYTES
    workspace_bytes: int | None = None
    calibration_cache: Path | None = None
    calibration_images: Path | None = None
    timing_cache: Path | None = None
    cache_dir: Path | None = None
    device: int = 0

    def validate(self) -> "BuildOptions":
        """Check the options without TensorRT; return ``self``.

        Raises:
            UsageError: Unknown precision, an unordered profile, or calibration for non-INT8.
        """
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"the profile needs 1 <= --min-batch <= --opt-batch <= --max-batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        if self.precision != "int8" and (self.calibration_cache or self.calibration_images):
            raise UsageError(f"--calib/--calib-cache apply to --int8 only, not --{self.precision}")
        if self.calibration_cache and self.calibration_images:
            raise UsageError("pass either --calib DIR (calibrate now) or --calib-cache FILE (reuse a cache), not both")
        if self.calibration_cache is not None and not Path(self.calibration_cache).is_file():
            raise UsageError(f"{self.calibration_cache}: calibration cache not found; make one with `memexport calibrate`")
        if self.calibration_images is not None and not Path(self.calibration_images).is_dir():
            raise UsageError(f"{self.calibration_images}: calibration image folder not found")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise UsageError(f"workspace must be positive, got {self.workspace_bytes}")
        return self

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly copy for the sidecar (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class OnnxInfo:
    """What the builder needs to know about an ONNX model before TensorRT sees it.

    Attributes:
        path: The file.
        sha256: Its sha256 (external data not included).
        metadata: The embedded memexport metadata.
        opset: Default-domain opset.
        has_qdq: The graph holds QuantizeLinear/DequantizeLinear (explicit INT8).
        is_fp16: Metadata precision ``fp16`` or FP16 weights (an FP16 ONNX).
        parameters: Weight elements (initializers).
        activation_elements: Peak live activation elements per image.
    """

    path: Path
    sha256: str
    metadata: ArtifactMetadata
    opset: int
    has_qdq: bool
    is_fp16: bool
    parameters: int
    activation_elements: int


def onnx_info(path: Path | str) -> OnnxInfo:
    """Read metadata, opset, precision markers, parameter count and activation size of an ONNX file.

    Raises:
        BackendUnavailableError: ``onnx`` is not installed. ArtifactError: unreadable file or no metadata.
    """
    onnx = require("onnx", "tensorrt", "building an engine (to read the ONNX graph)")
    from memexport.runtime.metadata import metadata_from_map

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: ONNX file not found; export one with `memexport export resmem -o {path.name}`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt artifact
        raise ArtifactError(f"{path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    metadata = metadata_from_map({p.key: p.value for p in proto.metadata_props}, path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    ops = {n.op_type for n in proto.graph.node}
    fp16_weights = any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    profile = budget.activation_profile(proto)
    return OnnxInfo(
        path=path, sha256=sha256_path(path), metadata=metadata, opset=opset,
        has_qdq=bool(ops & {"QuantizeLinear", "DequantizeLinear"}),
        is_fp16=metadata.precision == "fp16" or fp16_weights,
        parameters=int(metadata.extra.get("parameters") or budget.onnx_parameter_count(proto)),
        activation_elements=profile.peak_elements,
    )


@dataclass(frozen=True)
class PrecisionPlan:
    """How the requested precision is reached with this TensorRT and this ONNX.

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8``.
        source: ``fp32``, ``builder-flag``, ``fp16-onnx``, ``qdq-onnx`` or ``calibration-cache``.
        flags: ``BuilderFlag`` member names to set.
        calibration_cache: Cache replayed by the calibrator (implicit INT8 only).
    """

    precision: str
    source: str
    flags: tuple[str, ...] = ()
    calibration_cache: Path | None = None


def precision_plan(features: TrtFeatures, options: BuildOptions, info: OnnxInfo) -> PrecisionPlan:
    """Map the requested precision onto builder flags, a calibration cache or the ONNX's own types.

    Raises:
        UsageError: A combination this TensorRT or this ONNX cannot do, with the way out.
    """
    name = info.path.name
    if options.precision == "fp32":
        if info.has_qdq or info.is_fp16:
            kind = "an INT8 Q/DQ" if info.has_qdq else "an FP16"
            raise UsageError(f"{name} is {kind} ONNX; build it with --{'int8' if info.has_qdq else 'fp16'}, or pass the FP32 ONNX for --fp32")
        return PrecisionPlan("fp32", "fp32")
    if options.precision == "fp16":
        if info.has_qdq:
            raise UsageError(f"{name} is an INT8 Q/DQ ONNX; build it with --int8")
        if info.is_fp16:
            return PrecisionPlan("fp16", "fp16-onnx", ("FP16",) if features.precision_flags else ())
        if not features.precision_flags:
            raise UsageError(
                f"TensorRT {features.version} takes precision from the ONNX only (no FP16 builder flag); convert first with "
                f"`memexport convert --fp16 {name} -o {Path(name).stem}.fp16.onnx` and build that, or use TensorRT 8.6/10"
            )
        return PrecisionPlan("fp16", "builder-flag", ("FP16",))
    # int8
    if info.has_qdq:
        if options.calibration_cache:
            raise UsageError(f"{name} is a Q/DQ ONNX (explicit INT8); it takes no calibration cache: drop --calib-cache")
        return PrecisionPlan("int8", "qdq-onnx", ("INT8",) if features.precision_flags else ())
    if options.calibration_cache is None:
        raise UsageError(
            f"--int8 needs --calib-cache FILE, --calib DIR, or a Q/DQ ONNX from `memexport calibrate` (got the plain {name})"
        )
    if not features.implicit_int8:
        raise UsageError(
            f"TensorRT {features.version} has no implicit INT8 calibration; build the Q/DQ ONNX (<stem>.int8-qdq.onnx from "
            "`memexport calibrate`) instead of --calib-cache"
        )
    return PrecisionPlan("int8", "calibration-cache", ("INT8",), Path(options.calibration_cache))


def calibration_algorithm(data: bytes, path: Path) -> str:
    """The calibrator class a cache was written by, from its header ``TRT-<version>-<Algorithm>``.

    Raises:
        CalibrationError: An unreadable or unsupported header.
    """
    first = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
    match = CALIBRATION_HEADER.match(first)
    if not match or match.group(2) not in CALIBRATORS:
        raise CalibrationError(
            f"{path}: first line {first[:60]!r} is not a TensorRT calibration header; expected TRT-<version>-EntropyCalibration2 "
            "or TRT-<version>-MinMaxCalibration (make one with `memexport calibrate`)"
        )
    return CALIBRATORS[match.group(2)]


def cache_only_calibrator(cache: bytes, path: Path) -> Any:
    """An INT8 calibrator that only replays ``cache``: it has no images, so a cache missing
    tensors fails the build instead of calibrating on nothing."""
    base = getattr(tensorrt(), calibration_algorithm(cache, path))

    class CacheOnlyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.cache = cache

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return self.cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return CacheOnlyCalibrator()


def select_gpu(device: int = 0) -> GpuInfo:
    """The build GPU.

    Raises:
        BackendUnavailableError: No CUDA GPU with that ordinal.
    """
    gpus = gpu_facts.list_gpus()
    for gpu in gpus:
        if gpu.index == device:
            return gpu
    seen = ", ".join(f"{g.index}: {g.name}" for g in gpus) or "none"
    raise BackendUnavailableError(f"building an engine needs CUDA GPU {device}; visible GPUs: {seen}. Engines are built on the GPU they run on")


def parse_onnx(network: Any, logger: Any, path: Path) -> Any:
    """Parse ``path`` into ``network``; parser errors become one :class:`ArtifactError`."""
    parser = tensorrt().OnnxParser(network, logger)
    # parse_from_file resolves external data beside the model (ONNX over 2 GB).
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ArtifactError(f"{path}: TensorRT's ONNX parser failed: {'; '.join(errors[:3]) or 'no detail'}; check the opset and re-export")
    return parser


def configure_builder(
    builder: Any, options: BuildOptions, plan: PrecisionPlan, workspace: int, input_name: str,
    input_shape: tuple[int, ...], timing_cache: bytes | None, features: TrtFeatures,
) -> Any:
    """Create the builder config: workspace limit, precision flags, profile, calibrator, timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(enum_member("MemoryPoolType", "WORKSPACE"), workspace)
    for flag in plan.flags:
        config.set_flag(enum_member("BuilderFlag", flag))
    profile = builder.create_optimization_profile()
    shapes = [(b, *input_shape) for b in (options.min_batch, options.opt_batch, options.max_batch)]
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)
    if plan.calibration_cache is not None and features.implicit_int8:
        config.int8_calibrator = cache_only_calibrator(Path(plan.calibration_cache).read_bytes(), Path(plan.calibration_cache))
        config.set_calibration_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, False)
    return config


def timing_cache_file(options: BuildOptions, features: TrtFeatures, gpu: GpuInfo) -> Path:
    """The timing cache path; by default one per TensorRT version and GPU architecture (they are not portable)."""
    if options.timing_cache is not None:
        return Path(options.timing_cache)
    return (options.cache_dir or default_cache_dir()) / "tensorrt" / f"timing-{features.version}-{gpu.sm}.cache"


def engine_device_memory(features: TrtFeatures, logger: Any, plan_bytes: bytes) -> int:
    """Execution memory the engine needs at its profile's maximum, read back from the built plan."""
    runtime = tensorrt().Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise ArtifactError("TensorRT built a plan it cannot deserialise; see TensorRT's messages above")
    return device_memory_size(engine, features)


def cuda_runtime_version() -> str | None:
    from memexport.core.errors import CudaError
    from memexport.runtime.cuda import load_cuda

    try:
        return load_cuda().runtime_version()
    except (BackendUnavailableError, CudaError):
        return None


@dataclass(frozen=True)
class BuildResult:
    """What :func:`engine_from_onnx` wrote.

    Attributes:
        engine: The plan file.
        sidecar: Its JSON sidecar.
        info: The sidecar's content, typed.
        notes: Advice worth printing (e.g. FP16 on Pascal).
    """

    engine: Path
    sidecar: Path
    info: EngineSidecar
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def record(self) -> dict[str, Any]:
        """The sidecar as the JSON record written."""
        return self.info.as_dict()


def check_onnx_for(info: OnnxInfo, features: TrtFeatures) -> None:
    """Refuse an opset this TensorRT's parser cannot read."""
    if features.max_opset is not None and info.opset > features.max_opset:
        raise UsageError(
            f"{info.path}: opset {info.opset} but TensorRT {features.version}'s parser reads opset <= {features.max_opset}; re-export with --opset 17"
        )


def engine_from_onnx(onnx_path: Path | str, output: Path | str, options: BuildOptions = BuildOptions()) -> BuildResult:
    """Build a TensorRT engine from an exported ONNX model; write the plan and its sidecar atomically.

    Args:
        onnx_path: FP32 ONNX (or FP16 / Q/DQ ONNX) with memexport metadata.
        output: Destination plan (``.plan`` or ``.engine``); the sidecar is ``<output>.json``.
        options: See :class:`BuildOptions` (default: FP16, profile 1/8/32, 11 GiB budget).

    Returns:
        :class:`BuildResult`.

    Raises:
        BackendUnavailableError: No TensorRT or GPU, or TensorRT >= 10 on Pascal (names 8.6).
        UsageError: Options this TensorRT or ONNX cannot honour. BudgetError: Over the VRAM budget
            (names the largest batch that fits). ArtifactError: Unreadable ONNX or failed build.
    """
    options.validate()
    output = Path(output)
    if output.suffix.lower() not in (".plan", ".engine", ".trt"):
        raise UsageError(f"{output}: engine files end in .plan or .engine (the runtime picks the TensorRT runner by suffix)")
    features = trt_features(tensorrt(options.device).__version__)
    gpu = select_gpu(options.device)
    require_tensorrt_supports(gpu, features.version)
    info = onnx_info(onnx_path)
    check_onnx_for(info, features)
    plan = precision_plan(features, options, info)
    notes = (precision_advice(gpu.compute_capability),) if plan.precision == "fp16" and gpu.compute_capability[0] == 6 else ()
    workspace = options.workspace_bytes or budget.workspace_for_budget(
        info.parameters, plan.precision, options.max_batch, info.activation_elements, options.vram_budget_bytes
    )
    estimate = budget.require_fits(
        str(info.path), info.parameters, plan.precision, options.max_batch, info.activation_elements, options.vram_budget_bytes, workspace
    )
    plan_bytes, device_memory = serialized_engine(info, options, plan, workspace, features, timing_cache_file(options, features, gpu))
    sidecar = engine_sidecar(output, plan_bytes, device_memory, info, options, plan, features, gpu, workspace, estimate)
    from memexport.core.atomic import write_bytes_atomic, write_text_atomic

    # Plan first, sidecar last: a crash in between leaves a plan the runner refuses (no
    # sidecar, or a sidecar whose sha256 names another plan), never a silent mismatch.
    write_bytes_atomic(output, plan_bytes)
    write_text_atomic(sidecar_path(output), sidecar.to_json())
    return BuildResult(output, sidecar_path(output), sidecar, notes)


def serialized_engine(info: OnnxInfo, options: BuildOptions, plan: PrecisionPlan, workspace: int, features: TrtFeatures,
                      timing_path: Path) -> tuple[bytes, int]:
    """Parse, configure and build: the plan bytes and the execution memory read back from them.

    The timing cache at ``timing_path`` is read first and written back after the build.
    """
    from memexport.core.atomic import write_bytes_atomic

    trt = tensorrt()
    meta = info.metadata
    timing = timing_path.read_bytes() if timing_path.is_file() else None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(features))
    parser = parse_onnx(network, logger, info.path)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if [t.name for t in inputs] != [meta.input_name]:
        raise ArtifactError(f"{info.path}: TensorRT sees inputs {[t.name for t in inputs]}, metadata names {meta.input_name!r}; re-export it")
    config = configure_builder(builder, options, plan, workspace, meta.input_name, tuple(meta.input_shape), timing, features)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"{info.path}: TensorRT could not build the {plan.precision} engine (see TensorRT's messages above)")
    plan_bytes = bytes(memoryview(serialized))
    del parser
    write_bytes_atomic(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return plan_bytes, engine_device_memory(features, logger, plan_bytes)


def calibration_record(plan: PrecisionPlan, meta: ArtifactMetadata) -> dict[str, Any] | None:
    """Where the INT8 scales came from: the calibration cache (with its sha256) or the Q/DQ ONNX."""
    if plan.calibration_cache is not None:
        return {"file": str(plan.calibration_cache), "sha256": sha256_path(Path(plan.calibration_cache))}
    if plan.source == "qdq-onnx":
        return {"file": None, "sha256": None, "note": "explicit Q/DQ scales inside the ONNX", **dict(meta.extra.get("calibration", {}) or {})}
    return None


def engine_sidecar(output: Path, plan_bytes: bytes, device_memory: int, info: OnnxInfo, options: BuildOptions, plan: PrecisionPlan,
                   features: TrtFeatures, gpu: GpuInfo, workspace: int, estimate: budget.VramEstimate) -> EngineSidecar:
    """The sidecar of a freshly built plan: what it is and what it is tied to."""
    meta = info.metadata
    input_shape = tuple(meta.input_shape)
    load_estimate = budget.estimate_engine_load(len(plan_bytes), device_memory, io_bytes(input_shape, options.max_batch), plan.precision,
                                                options.max_batch, options.vram_budget_bytes)
    return EngineSidecar(
        plan={"file": output.name, "bytes": len(plan_bytes), "sha256": sha256_bytes(plan_bytes)},
        tensorrt=str(features.version),
        cuda_runtime=cuda_runtime_version(),
        gpu={"name": gpu.name, "compute_capability": f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}", "total_memory": gpu.total_memory},
        precision=plan.precision,
        precision_source=plan.source,
        profile={
            "input": meta.input_name,
            "min": [options.min_batch, *input_shape], "opt": [options.opt_batch, *input_shape], "max": [options.max_batch, *input_shape],
        },
        onnx={"file": str(info.path), "sha256": info.sha256, "opset": info.opset},
        calibration=calibration_record(plan, meta),
        build_options=options.as_record(),
        workspace_bytes=workspace,
        device_memory_size=device_memory,
        vram_estimate={"build": estimate.as_dict(), "load": load_estimate.as_dict()},
        memexport_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # The artifact metadata, so the runtime needs nothing but the plan and this file.
        metadata=replace(meta, precision=plan.precision, versions={**meta.versions, "tensorrt": str(features.version)}),
    )
