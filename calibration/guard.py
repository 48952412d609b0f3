"""The rank-fidelity guard: INT8 only ships when it keeps the ranking on held-out images.

Each INT8 artifact is scored against the FP32 model on images calibration never saw. When it
falls short, per-layer sensitivity is measured on a *switchable* fake-quant model: one ONNX
Runtime session in which every quantisable layer has its INT8 quantise/dequantise behind a
0/1 switch fed as an input, so turning single layers (or all but a few) on costs one
inference, never a rebuild. Layers are then kept in FP32 greedily, most sensitive first,
until the simulation meets the target; the real artifact is rebuilt with that fallback set
and checked again, widening the set if the real kernels still fall short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from memexport.errors import CalibrationError
from memexport.parity import ParityReport, compare
from memexport.spec import Tolerance

SWITCH_INPUT = "memexport_quant_switch"


@dataclass(frozen=True)
class GuardTarget:
    """What an INT8 artifact must reach against FP32 on the held-out images.

    Attributes:
        min_spearman: Lowest Spearman rho (default 0.99).
        max_mean_abs: Largest mean absolute score error (default 0.01, the spec's INT8 tolerance).
    """

    min_spearman: float = 0.99
    max_mean_abs: float = 0.01

    def tolerance(self) -> Tolerance:
        """The target as a parity :class:`~memexport.spec.Tolerance` (no Kendall bound)."""
        return Tolerance(atol=self.max_mean_abs, statistic="mean", min_spearman=self.min_spearman, min_kendall=-1.0)


def fidelity(candidate: np.ndarray, reference: np.ndarray, target: GuardTarget = GuardTarget()) -> ParityReport:
    """Agreement of INT8 scores with FP32 scores; ``passed`` says whether ``target`` is met."""
    return compare(candidate, reference, target.tolerance())


@dataclass(frozen=True)
class GuardReport:
    """What the guard found for one artifact.

    Attributes:
        initial: Agreement with FP32 with every layer quantised.
        final: Agreement with FP32 of the artifact as written.
        fallback: Layers kept in FP32, most sensitive first.
        sensitivity: Per-layer sensitivity (mean |score error| with only that layer in INT8),
            empty when the first check passed.
        target: The target applied.
        passed: Whether ``final`` meets ``target``.
    """

    initial: ParityReport
    final: ParityReport
    fallback: tuple[str, ...]
    sensitivity: Mapping[str, float]
    target: GuardTarget
    passed: bool

    def table(self, limit: int | None = None) -> list[tuple[str, float, str]]:
        """Rows ``(layer, sensitivity, precision)``, most sensitive first (fallback layers always shown)."""
        rows = sorted(self.sensitivity.items(), key=lambda item: -item[1])
        fallback = set(self.fallback)
        out = [(name, value, "fp32" if name in fallback else "int8") for name, value in rows]
        if limit is not None and len(out) > limit:
            out = out[:limit] + [row for row in out[limit:] if row[2] == "fp32"]
        return out


def ort_session(proto_or_path: Any, basic: bool = False) -> Any:
    """A CPU ONNX Runtime session on an ``onnx.ModelProto`` or a file path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = proto_or_path if isinstance(proto_or_path, (str, bytes)) else (proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") else str(proto_or_path))
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def session_scores(session: Any, batch: np.ndarray, chunk: int = 8, extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Scores (first output, flattened) of ``batch`` in chunks."""
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: batch[i : i + chunk], **(extra or {})})[0].reshape(-1) for i in range(0, len(batch), chunk)]
    return np.concatenate(parts).astype(np.float64)


class SwitchableModel:
    """The FP32 graph with per-layer INT8 fake quantisation behind 0/1 switches.

    Layer ``l`` computes with ``x + s_l * (dq(q(x)) - x)`` as input and ``W + s_l * (Wq - W)``
    as weight: symmetric per-tensor INT8 activations and per-channel INT8 weights, the
    numerics of the Q/DQ artifact, when ``s_l = 1``; exact FP32 when ``s_l = 0``.

    With ``u8_ranges`` it simulates the ONNX Runtime CPU artifact instead: asymmetric UINT8
    inputs *and outputs* (a QLinearConv writes UINT8, so a layer's output is requantised with
    the range of the tensor it feeds, its Relu's when it has one).

    Args:
        proto: FP32 ``onnx.ModelProto``.
        amax: Dynamic range per activation tensor.
        layers: Layer names that get a switch.
        u8_ranges: ``(low, high)`` per tensor for the CPU artifact's UINT8 mode (default ``None``:
            the symmetric INT8 Q/DQ mode).
    """

    def __init__(self, proto: Any, amax: Mapping[str, float], layers: Sequence[str], u8_ranges: Mapping[str, tuple[float, float]] | None = None) -> None:
        import onnx
        from onnx import helper, numpy_helper

        from memexport.calibration.qdq import fake_quantize_weight, layer_name, weight_axis

        model = onnx.ModelProto()
        model.CopyFrom(proto)
        graph = model.graph
        weights = {t.name: t for t in graph.initializer}
        wanted = {name: index for index, name in enumerate(layers)}
        self.layers = list(layers)
        nodes, inits = [], []
        consumers: dict[str, list[Any]] = {}
        for original in proto.graph.node:
            for name in original.input:
                consumers.setdefault(name, []).append(original)

        def fake_quant(tensor: str, source: str, tag: str, out: str) -> None:
            """``out = tensor + s * (fq(tensor) - tensor)`` with ``source``'s range."""
            if u8_ranges is None:
                scale, zp = np.array(max(amax[source] / 127.0, 1e-8), np.float32), np.zeros((), np.int8)
            else:
                low, high = u8_ranges[source]
                scale = np.array(max((high - low) / 255.0, 1e-8), np.float32)
                zp = np.array(np.clip(round(-low / float(scale)), 0, 255), np.uint8)
            inits.extend([numpy_helper.from_array(scale, f"{tag}_scale"), numpy_helper.from_array(zp, f"{tag}_zp")])
            nodes.extend([
                helper.make_node("QuantizeLinear", [tensor, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"]),
                helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [f"{tag}_dq"]),
                helper.make_node("Sub", [f"{tag}_dq", tensor], [f"{tag}_err"]),
                helper.make_node("Mul", [f"{tag}_err", f"{tag}_s"], [f"{tag}_err_on"]),
                helper.make_node("Add", [tensor, f"{tag}_err_on"], [out]),
            ])

        ranges = amax if u8_ranges is None else u8_ranges
        for original in proto.graph.node:
            node = onnx.NodeProto()
            node.CopyFrom(original)
            name = layer_name(node)
            output_fq = None
            if name in wanted and node.input[0] in ranges and node.input[1] in weights:
                index, x, w = wanted[name], node.input[0], node.input[1]
                tag = f"switch{index}"
                array = numpy_helper.to_array(weights[w])
                inits += [
                    numpy_helper.from_array(np.array([index], np.int64), f"{tag}_index"),
                    numpy_helper.from_array(fake_quantize_weight(array, weight_axis(node)) - array, f"{tag}_wdelta"),
                ]
                nodes.append(helper.make_node("Gather", [SWITCH_INPUT, f"{tag}_index"], [f"{tag}_s"], axis=0))
                fake_quant(x, x, tag, f"{tag}_x")
                nodes += [
                    helper.make_node("Mul", [f"{tag}_wdelta", f"{tag}_s"], [f"{tag}_werr_on"]),
                    helper.make_node("Add", [w, f"{tag}_werr_on"], [f"{tag}_w"]),
                ]
                node.input[0], node.input[1] = f"{tag}_x", f"{tag}_w"
                y = node.output[0]
                if u8_ranges is not None:
                    users = consumers.get(y, [])
                    source = users[0].output[0] if len(users) == 1 and users[0].op_type == "Relu" else y
                    if source in u8_ranges:
                        node.output[0] = f"{tag}_y"
                        output_fq = (f"{tag}_y", source, f"{tag}o", y, tag)
            nodes.append(node)
            if output_fq is not None:
                tensor, source, otag, out, tag = output_fq
                nodes.append(helper.make_node("Identity", [f"{tag}_s"], [f"{otag}_s"]))
                fake_quant(tensor, source, otag, out)
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        graph.input.append(helper.make_tensor_value_info(SWITCH_INPUT, onnx.TensorProto.FLOAT, [len(layers)]))
        self.session = ort_session(model, basic=True)

    def scores(self, batch: np.ndarray, enabled: Sequence[str] | set[str]) -> np.ndarray:
        """Scores with the ``enabled`` layers in (simulated) INT8 and the rest in FP32."""
        enabled = set(enabled)
        switch = np.array([1.0 if name in enabled else 0.0 for name in self.layers], dtype=np.float32)
        return session_scores(self.session, batch, extra={SWITCH_INPUT: switch})


def layer_sensitivity(model: SwitchableModel, batch: np.ndarray, reference: np.ndarray, progress: Callable[[int, int], None] = lambda d, t: None) -> dict[str, float]:
    """Mean |score error| against FP32 with only one layer in INT8, for every switchable layer."""
    out = {}
    for index, name in enumerate(model.layers):
        out[name] = float(np.mean(np.abs(model.scores(batch, {name}) - reference)))
        progress(index + 1, len(model.layers))
    return out


def greedy_fallback(model: SwitchableModel, batch: np.ndarray, reference: np.ndarray, sensitivity: Mapping[str, float], target: GuardTarget) -> tuple[str, ...]:
    """The fewest most-sensitive layers to keep in FP32 so the simulation meets ``target``.

    Greedy by sensitivity; the count is found by bisection, assuming more fallback never
    hurts (checked by the caller on the real artifact).
    """
    order = [name for name, _ in sorted(sensitivity.items(), key=lambda item: -item[1])]

    def meets(count: int) -> bool:
        enabled = set(order[count:])
        return fidelity(model.scores(batch, enabled), reference, target).passed

    low, high = 0, len(order)
    if meets(0):
        return ()
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return tuple(order[:high])


@dataclass
class Guard:
    """Runs the guard for artifacts of one model, sharing the sensitivity measurement.

    Args:
        fp32: The FP32 ``onnx.ModelProto``.
        amax: Dynamic range per tensor.
        layers: Quantisable layer names.
        held_out: Held-out batch (float32 NCHW).
        reference: FP32 scores of ``held_out``.
        target: See :class:`GuardTarget`.
        log: Receives progress lines (default: silent).
        max_rounds: Rebuilds with a widened (doubled) fallback set before giving up (default 6).
        cache: JSON file keeping the measured sensitivity, reused when ``cache_key`` matches
            (default ``None``: not kept).
        cache_key: Identifies model, ranges and held-out images for ``cache``.
        u8_ranges: Simulate the UINT8 CPU artifact with these ranges (default ``None``: Q/DQ INT8).
        sensitivity_images: Held-out images that rank the layers (default 8). Ranking needs few
            images and costs one inference per layer; choosing and checking the fallback set
            always uses all of them.
    """

    fp32: Any
    amax: Mapping[str, float]
    layers: Sequence[str]
    held_out: np.ndarray
    reference: np.ndarray
    target: GuardTarget = GuardTarget()
    log: Callable[[str], None] = lambda _: None
    max_rounds: int = 6
    cache: Any = None
    cache_key: str = ""
    u8_ranges: Any = None
    sensitivity_images: int = 8
    _sensitivity: dict[str, float] = field(default_factory=dict)
    _simulation: Any = None

    def simulation(self) -> SwitchableModel:
        if self._simulation is None:
            self._simulation = SwitchableModel(self.fp32, self.amax, self.layers, self.u8_ranges)
        return self._simulation

    def sensitivity(self) -> dict[str, float]:
        """Per-layer sensitivity, measured once (and kept in ``cache`` when given)."""
        import json
        from pathlib import Path

        if not self._sensitivity and self.cache is not None and Path(self.cache).is_file():
            try:
                data = json.loads(Path(self.cache).read_text())
                if data.get("key") == self.cache_key and set(data["sensitivity"]) == set(self.layers):
                    self._sensitivity = {k: float(v) for k, v in data["sensitivity"].items()}
                    self.log(f"reusing per-layer sensitivity from {self.cache}")
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        if not self._sensitivity:
            count = min(len(self.held_out), self.sensitivity_images)
            self.log(f"measuring per-layer sensitivity of {len(self.layers)} layers on {count} held-out images")
            simulation = self.simulation()
            step = max(1, len(self.layers) // 10)

            def progress(done: int, total: int) -> None:
                if done % step == 0 or done == total:
                    self.log(f"  sensitivity: {done}/{total} layers")

            self._sensitivity = layer_sensitivity(simulation, self.held_out[:count], self.reference[:count], progress)
            if self.cache is not None:
                from memexport.atomic import write_text_atomic

                write_text_atomic(self.cache, json.dumps({"key": self.cache_key, "sensitivity": self._sensitivity}, indent=1))
        return self._sensitivity

    def run(
        self, build: Callable[[frozenset[str]], Any], what: str, candidates: Sequence[str] | None = None,
        score: Callable[[Any, np.ndarray], np.ndarray] | None = None,
    ) -> tuple[Any, GuardReport]:
        """Build with no fallback; if short of the target, find and apply a minimal fallback set.

        Args:
            build: Makes the artifact's ``onnx.ModelProto`` with the given layers kept in FP32.
            what: Name for messages.
            candidates: Layers this artifact quantises, hence may keep in FP32 (default: all ``layers``).
            score: Scores a built artifact on a batch, on the runtime it is made for (default: ONNX
                Runtime CPU, for ONNX protos).

        Returns:
            The final proto and its report.

        Raises:
            CalibrationError: The target is out of reach even with every layer in FP32.
        """
        if score is None:
            score = lambda proto, batch: session_scores(ort_session(proto), batch)  # noqa: E731
        proto = build(frozenset())
        initial = fidelity(score(proto, self.held_out), self.reference, self.target)
        self.log(f"{what}: all layers INT8: spearman {initial.spearman:.4f}, mean abs {initial.mean_abs:.4f} on {initial.count} held-out images")
        if initial.passed:
            return proto, GuardReport(initial, initial, (), {}, self.target, True)
        wanted = set(self.layers if candidates is None else candidates)
        sensitivity = {name: value for name, value in self.sensitivity().items() if name in wanted}
        order = [name for name, _ in sorted(sensitivity.items(), key=lambda item: -item[1])]
        fallback = greedy_fallback(self.simulation(), self.held_out, self.reference, sensitivity, self.target)
        count = max(len(fallback), 1)
        final, tried = initial, 0
        for _ in range(self.max_rounds):
            chosen = tuple(order[:count])
            proto = build(frozenset(chosen))
            final = fidelity(score(proto, self.held_out), self.reference, self.target)
            tried = count
            self.log(f"{what}: {count} layer(s) in FP32: spearman {final.spearman:.4f}, mean abs {final.mean_abs:.4f}")
            if final.passed:
                return proto, GuardReport(initial, final, chosen, sensitivity, self.target, True)
            if count >= len(order):
                break
            count = min(len(order), count * 2)
        raise CalibrationError(
            f"{what}: INT8 reaches spearman {final.spearman:.4f} / mean abs {final.mean_abs:.4f} against FP32, short of "
            f"spearman >= {self.target.min_spearman:g} / mean abs <= {self.target.max_mean_abs:g} even with {tried} layer(s) in FP32; "
            "calibrate on more images, try --method percentile, or lower --min-spearman"
        )
