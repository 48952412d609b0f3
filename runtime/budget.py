"""VRAM budget arithmetic: pure logic, no GPU needed.

An engine needs, on the device: its weights at the engine's precision, the activations of
the largest batch in its profile, the builder/runtime workspace, and the CUDA context
(driver, cuDNN/cuBLAS handles). memexport checks the sum against the budget (11 GiB for a
GTX 1080 Ti by default) before building and before loading, and names the largest batch
that fits when it does not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from memexport.core.errors import BudgetError, UsageError

GIB = 1024**3
MIB = 1024**2
DEFAULT_BUDGET_BYTES = 11 * GIB
# A CUDA context with cuDNN and cuBLAS loaded costs several hundred MiB before any tensor.
CUDA_CONTEXT_BYTES = 600 * MIB
BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "int8": 1}
# Activations of INT8 engines still hold FP32/FP16 tensors at layer boundaries and fallback layers.
BYTES_PER_ACTIVATION = {"fp32": 4, "fp16": 2, "int8": 2}


@dataclass(frozen=True)
class VramEstimate:
    """Estimated device memory for one precision and batch size (all sizes in bytes).

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8``.
        batch_size: Batch the activations are sized for.
        weights: Weights at that precision.
        activations: Activations of ``batch_size`` images.
        workspace: Builder/runtime scratch space.
        context: CUDA context overhead.
        total: Sum of the above.
        budget: The budget it is checked against.
    """

    precision: str
    batch_size: int
    weights: int
    activations: int
    workspace: int
    context: int
    total: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def as_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}


def estimate_vram(
    parameters: int,
    precision: str,
    batch_size: int,
    activation_elements_per_image: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    workspace_bytes: int = 512 * MIB,
) -> VramEstimate:
    """Estimate device memory for an engine.

    Args:
        parameters: Trainable parameter count of the model.
        precision: ``fp32``, ``fp16`` or ``int8``.
        batch_size: Largest batch the engine runs.
        activation_elements_per_image: Peak live activation elements for one image.
        budget_bytes: The VRAM budget (default 11 GiB).
        workspace_bytes: Builder/runtime workspace (default 512 MiB).
    """
    if precision not in BYTES_PER_WEIGHT:
        raise UsageError(f"unknown precision {precision!r}; expected fp32, fp16 or int8")
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    weights = parameters * BYTES_PER_WEIGHT[precision]
    activations = activation_elements_per_image * BYTES_PER_ACTIVATION[precision] * batch_size
    total = weights + activations + workspace_bytes + CUDA_CONTEXT_BYTES
    return VramEstimate(precision, batch_size, weights, activations, workspace_bytes, CUDA_CONTEXT_BYTES, total, budget_bytes)


def largest_batch_that_fits(
    parameters: int, precision: str, activation_elements_per_image: int, budget_bytes: int = DEFAULT_BUDGET_BYTES,
    workspace_bytes: int = 512 * MIB, ceiling: int = 4096,
) -> int:
    """Largest batch size within the budget (0 when even batch 1 does not fit), up to ``ceiling`` (default 4096)."""
    fixed = estimate_vram(parameters, precision, 1, 0, budget_bytes, workspace_bytes).total
    per_image = activation_elements_per_image * BYTES_PER_ACTIVATION[precision]
    if fixed + per_image > budget_bytes:
        return 0
    if per_image == 0:
        return ceiling
    return min(ceiling, (budget_bytes - fixed) // per_image)


def require_fits(what: str, parameters: int, precision: str, batch_size: int, activation_elements_per_image: int,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES, workspace_bytes: int = 512 * MIB) -> VramEstimate:
    """Return the estimate, or raise :class:`BudgetError` naming the largest batch that fits."""
    estimate = estimate_vram(parameters, precision, batch_size, activation_elements_per_image, budget_bytes, workspace_bytes)
    if not estimate.fits:
        best = largest_batch_that_fits(parameters, precision, activation_elements_per_image, budget_bytes, workspace_bytes)
        hint = f"the largest batch that fits is {best} (--max-batch {best})" if best else "even batch 1 does not fit: use INT8 or a larger GPU"
        raise BudgetError(
            f"{what}: {precision} at batch {batch_size} needs an estimated {estimate.total / GIB:.2f} GiB, over the "
            f"{budget_bytes / GIB:.2f} GiB VRAM budget; {hint}"
        )
    return estimate


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the ONNX file plus its external-data file, a close stand-in for FP32 weights."""
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.is_file():
        total += data.stat().st_size
    return total


def check_onnx_fits(path: Path, budget_bytes: int) -> None:
    """Refuse an ONNX model whose weights and CUDA context exceed the budget (before a CUDA session starts).

    Activations are not counted: ONNX Runtime allocates them per call, and the torch-free runtime has
    no ``onnx`` package to size them. TensorRT engines get the full estimate (:func:`require_engine_fits`).
    """
    need = onnx_weight_bytes(path) + CUDA_CONTEXT_BYTES
    if need > budget_bytes:
        raise BudgetError(
            f"{path}: weights and CUDA context need {need / GIB:.2f} GiB, over the {budget_bytes / GIB:.2f} GiB VRAM budget; "
            "use the INT8 artifact or a larger GPU"
        )


# ---------------------------------------------------------------------------------------------
# TensorRT: workspace from the budget, estimates before building and loading, and measurement.

# Keep the builder's scratch in a sane range: below 64 MiB many tactics are skipped; above
# 4 GiB nothing in these models gains, and the engine's device memory grows with it.
MIN_WORKSPACE_BYTES = 64 * MIB
MAX_WORKSPACE_BYTES = 4 * GIB


def parse_bytes(text: str | int) -> int:
    """Parse a size such as ``11GiB``, ``11 GB``, ``512MiB`` or ``1048576`` into bytes.

    ``GB``/``MB`` are read as binary units like ``GiB``/``MiB``, as GPU makers mean them
    when they say "11 GB".

    Raises:
        UsageError: For an unreadable or non-positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        raw = text.strip().lower().replace(" ", "")
        units = {"tib": 1024**4, "tb": 1024**4, "gib": GIB, "gb": GIB, "g": GIB, "mib": MIB, "mb": MIB, "m": MIB, "kib": 1024, "kb": 1024, "k": 1024, "b": 1}
        factor = 1
        for suffix, size in units.items():
            if raw.endswith(suffix):
                raw, factor = raw[: -len(suffix)], size
                break
        try:
            value = int(float(raw) * factor)
        except ValueError:
            raise UsageError(f"cannot read the size {text!r}; expected a number with an optional unit such as 11GiB or 512MiB") from None
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


def workspace_for_budget(parameters: int, precision: str, max_batch: int, activation_elements_per_image: int,
                         budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """The builder workspace limit derived from the VRAM budget.

    Half of what the budget leaves after weights, activations at ``max_batch`` and the CUDA
    context, clamped to 64 MiB .. 4 GiB; the other half is margin for the estimate's error.

    Raises:
        BudgetError: When not even the minimum workspace fits; names the largest batch that does.
    """
    base = estimate_vram(parameters, precision, max_batch, activation_elements_per_image, budget_bytes, workspace_bytes=0)
    headroom = budget_bytes - base.total
    if headroom < MIN_WORKSPACE_BYTES:
        best = largest_batch_that_fits(parameters, precision, activation_elements_per_image, budget_bytes, MIN_WORKSPACE_BYTES)
        hint = f"the largest batch that fits is {best} (--max-batch {best})" if best else "even batch 1 does not fit: use INT8 or a larger GPU"
        raise BudgetError(
            f"{precision} at max batch {max_batch} needs an estimated {(base.total + MIN_WORKSPACE_BYTES) / GIB:.2f} GiB with the minimum "
            f"{MIN_WORKSPACE_BYTES // MIB} MiB workspace, over the {budget_bytes / GIB:.2f} GiB VRAM budget; {hint}"
        )
    return int(min(MAX_WORKSPACE_BYTES, max(MIN_WORKSPACE_BYTES, headroom // 2)))


def estimate_engine_load(plan_bytes: int, device_memory_bytes: int, io_bytes: int, precision: str, max_batch: int,
                         budget_bytes: int = DEFAULT_BUDGET_BYTES) -> VramEstimate:
    """Device memory to load an engine: its weights (about the plan size), its execution memory
    (``device_memory_size``: activations and scratch at the profile's maximum), the I/O buffers
    and the CUDA context."""
    total = plan_bytes + device_memory_bytes + io_bytes + CUDA_CONTEXT_BYTES
    return VramEstimate(precision, max_batch, plan_bytes, device_memory_bytes + io_bytes, 0, CUDA_CONTEXT_BYTES, total, budget_bytes)


def require_engine_fits(what: str, estimate: VramEstimate, free_bytes: int | None = None) -> VramEstimate:
    """Refuse an engine over the budget (or over the GPU's free memory, when known).

    The largest batch that fits is scaled from the engine's execution memory, which grows
    about linearly with the profile's maximum batch.

    Raises:
        BudgetError: Naming the largest batch that fits, and the rebuild command.
    """
    limit = estimate.budget if free_bytes is None else min(estimate.budget, free_bytes + CUDA_CONTEXT_BYTES)
    if estimate.total <= limit:
        return estimate
    fixed = estimate.weights + estimate.context
    per_image = estimate.activations / max(estimate.batch_size, 1)
    best = int((limit - fixed) // per_image) if per_image and limit > fixed else 0
    best = max(0, min(best, estimate.batch_size - 1))
    where = "the VRAM budget" if limit == estimate.budget else "the GPU's free memory"
    hint = f"rebuild with --max-batch {best} (the largest batch that fits)" if best else "even batch 1 does not fit: use INT8 or a larger GPU"
    raise BudgetError(
        f"{what}: loading needs an estimated {estimate.total / GIB:.2f} GiB at max batch {estimate.batch_size}, over {where} "
        f"({limit / GIB:.2f} GiB); {hint}"
    )


@dataclass(frozen=True)
class ActivationProfile:
    """Activation sizes of one image through an ONNX graph (elements, not bytes).

    Attributes:
        peak_elements: Largest sum of simultaneously live tensors, walking nodes in order
            and freeing each tensor after its last use.
        total_elements: Sum of every activation tensor (an upper bound without reuse).
        unknown: Tensors whose shape inference left unknown dimensions (not counted).
    """

    peak_elements: int
    total_elements: int
    unknown: tuple[str, ...]


def activation_profile(model: object) -> ActivationProfile:
    """Peak live activation elements for ONE image, from ONNX shape inference.

    Args:
        model: An ``onnx.ModelProto`` (weights may be external and unloaded). The first
            dimension of every graph input is fixed to 1 before inference.
    """
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model)  # type: ignore[arg-type]
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    graph = inferred.graph
    sizes: dict[str, int] = {}
    unknown: list[str] = []
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim] if tensor_type.HasField("shape") else [None]
        if any(d is None or d < 0 for d in dims):
            unknown.append(value.name)
            continue
        count = 1
        for d in dims:
            count *= d
        sizes[value.name] = count
    constants = {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    nodes = [n for n in graph.node if n.op_type != "Constant"]
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = index
    outputs = {v.name for v in graph.output}
    live = {v.name for v in graph.input if v.name in sizes}
    current = sum(sizes[n] for n in live)
    peak = current
    for index, node in enumerate(nodes):
        for name in node.output:
            if name in sizes and name not in constants and name not in live:
                live.add(name)
                current += sizes[name]
        peak = max(peak, current)
        for name in list(live):
            if name not in outputs and last_use.get(name, -1) <= index:
                live.discard(name)
                current -= sizes[name]
    total = sum(size for name, size in sizes.items() if name not in constants)
    return ActivationProfile(int(peak), int(total), tuple(sorted(set(unknown) - constants)))


def onnx_parameter_count(model: object) -> int:
    """Elements in the graph's initializers (the weights), read from shapes only."""
    total = 0
    for tensor in model.graph.initializer:  # type: ignore[attr-defined]
        count = 1
        for d in tensor.dims:
            count *= d
        total += count
    return total


def free_vram(device: int = 0) -> int | None:
    """Free bytes on ``device`` from ``cudaMemGetInfo``, or ``None`` without CUDA or a GPU."""
    from memexport.core.errors import BackendUnavailableError, CudaError
    from memexport.runtime.cuda import load_cuda

    try:
        api = load_cuda()
        if api.device_count() <= device:
            return None
        api.set_device(device)
        return api.mem_get_info()[0]
    except (BackendUnavailableError, CudaError):
        return None


def vram_delta(before_free: int | None, after_free: int | None) -> int | None:
    """Bytes taken between two ``cudaMemGetInfo`` readings (``None`` when either is missing).

    The first CUDA call creates the context, so a delta taken after that excludes the
    context; compare it with an estimate's ``total - context``.
    """
    if before_free is None or after_free is None:
        return None
    return before_free - after_free


def compare_measured(estimate: VramEstimate, measured_bytes: int | None) -> dict:
    """Estimate vs measured usage, for ``bench`` and the GPU tests (context excluded on both sides)."""
    expected = estimate.total - estimate.context
    return {
        "estimated_bytes": expected,
        "measured_bytes": measured_bytes,
        "measured_over_estimate": None if not measured_bytes or not expected else round(measured_bytes / expected, 3),
    }
