"""The rank-fidelity guard: INT8 ships verified only when its fidelity estimate shows the target.

Each INT8 artifact is judged by :mod:`memexport.calibration.fidelity`'s estimate of the Spearman
and mean error it keeps on new photos, with a 90% interval. When the interval's lower end
misses the target, units (single layers, or whole blocks for the CPU artifact, whose single-layer
islands add requantisations) are ranked by sensitivity on a *switchable* fake-quant model: one
ONNX Runtime session in which every quantisable layer has its INT8 quantise/dequantise behind a
0/1 switch fed as an input, so one inference ranks one unit, never a rebuild. The most
sensitive 1, 2, 4, ... units are then kept in FP32, each step rebuilt and re-estimated; a step
that does not improve the estimate is not taken, so fallback never makes the estimate worse.

Choosing the best of several estimates on the same images flatters the winner, so the estimate
reported for the artifact shipped is not the winner's own: it is the nested cross-validation of
:mod:`memexport.calibration.selection` (choose on the other folds, judge on this one), ranking
units without the judged fold's images too. The winner's own estimate stays in the report
(:attr:`GuardReport.chosen`) and in each step's record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from memexport.calibration.fidelity import FidelityEstimate, FidelityTarget

SWITCH_INPUT = "memexport_quant_switch"


# ResNet node names are /features/<stage>/<block>/<layer>/<op>: a block is the first three parts.
_BLOCK_DEPTH = 4


def block_unit(layer: str) -> str:
    """The block a layer belongs to (``/features/layer3/layer3.17/`` for its convolutions), else the layer itself."""
    parts = layer.split("/")
    return "/".join(parts[:_BLOCK_DEPTH]) + "/" if len(parts) > _BLOCK_DEPTH else layer


@dataclass(frozen=True)
class FallbackStep:
    """One step of the fallback search.

    Attributes:
        units: Most sensitive units kept in FP32.
        layers: Layers they hold.
        estimate: The rebuilt artifact's estimate.
        taken: Whether the step improved on the best estimate so far (only then is it kept).
    """

    units: int
    layers: int
    estimate: FidelityEstimate
    taken: bool


@dataclass(frozen=True)
class GuardReport:
    """What the guard found for one artifact.

    Attributes:
        initial: Estimate with every layer quantised.
        final: Estimate of the artifact as written.
        fallback: Layers kept in FP32, most sensitive unit first.
        sensitivity: Per-unit sensitivity (mean |score error| with only that unit in INT8),
            empty when the first estimate was verified.
        target: The target applied.
        steps: The fallback steps tried, in order.
        fallback_units: The units (blocks or layers) ``fallback`` consists of.
        chosen: The shipped candidate's own estimate on every evidence image (optimistic when
            several were tried; ``final`` is the nested one), ``None`` when nothing was chosen.
        candidates: Every candidate tried (:class:`~memexport.calibration.selection.Candidate`), in order.
    """

    initial: FidelityEstimate
    final: FidelityEstimate
    fallback: tuple[str, ...]
    sensitivity: Mapping[str, float]
    target: FidelityTarget
    steps: tuple[FallbackStep, ...] = ()
    fallback_units: tuple[str, ...] = ()
    chosen: FidelityEstimate | None = None
    candidates: tuple = ()

    @property
    def verified(self) -> bool:
        return self.final.verified(self.target)

    @property
    def refuted(self) -> bool:
        return self.final.refuted(self.target)

    def table(self, limit: int | None = None) -> list[tuple[str, float, str]]:
        """Rows ``(unit, sensitivity, precision)``, most sensitive first (fallback units always shown)."""
        rows = sorted(self.sensitivity.items(), key=lambda item: -item[1])
        fallback = set(self.fallback_units)
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


def unit_errors(
    model: SwitchableModel, batch: np.ndarray, reference: np.ndarray, units: Mapping[str, Sequence[str]],
    progress: Callable[[int, int], None] = lambda d, t: None,
) -> dict[str, np.ndarray]:
    """Per image, the |score error| against FP32 with only one unit's layers in INT8, for every unit."""
    out = {}
    for index, (unit, layers) in enumerate(units.items()):
        out[unit] = np.abs(model.scores(batch, set(layers)) - reference)
        progress(index + 1, len(units))
    return out


def unit_sensitivity(
    model: SwitchableModel, batch: np.ndarray, reference: np.ndarray, units: Mapping[str, Sequence[str]],
    progress: Callable[[int, int], None] = lambda d, t: None,
) -> dict[str, float]:
    """Mean |score error| against FP32 with only one unit's layers in INT8, for every unit."""
    return {unit: float(values.mean()) for unit, values in unit_errors(model, batch, reference, units, progress).items()}


def images_key(batch: np.ndarray) -> str:
    """A digest of the pixels that rank the units: part of the sensitivity cache's key."""
    import hashlib

    array = np.ascontiguousarray(batch, dtype=np.float32)
    return f"{len(array)}:{hashlib.sha256(array.tobytes()).hexdigest()[:24]}"


# Builds the artifact with the given layers in FP32; returns it and, per evidence image, its views' errors.
Evaluate = Callable[[frozenset], "tuple[Any, list]"]


@dataclass
class Guard:
    """Runs the estimate-driven fallback for one artifact.

    Args:
        fp32: The FP32 ``onnx.ModelProto``.
        amax: Dynamic range per tensor (for the Q/DQ simulation).
        layers: Layers the artifact quantises, hence may keep in FP32.
        batch: Images that rank the units (float32 NCHW): the first evidence images, in order
            (row ``i`` is evidence image ``i``), so a judged block can rank without its own.
        reference: FP32 scores of ``batch``.
        target: See :class:`~memexport.calibration.fidelity.FidelityTarget`.
        log: Receives progress lines (default: silent).
        max_rounds: Fallback steps tried, keeping the most sensitive 1, 2, 4, ... units (default 4).
        cache: JSON file keeping the measured sensitivity, reused when ``cache_key`` matches
            (default ``None``: not kept).
        cache_key: Identifies model and ranges for ``cache`` (the ranking images' pixels are added to it, :func:`images_key`).
        u8_ranges: Simulate the UINT8 CPU artifact with these ranges (default ``None``: Q/DQ INT8).
        sensitivity_images: Images that rank the units (default 8).
        unit_of: Maps a layer to its fallback unit (default: the layer itself; :func:`block_unit` for blocks).
        scores: FP32 score of every evidence image (default ``reference``).
        other_scores: FP32 scores of further images, for the scores' spread (default none).
        blocks: The judging blocks of the nested estimate (default: the images dealt into
            :data:`~memexport.calibration.selection.HELD_OUT_BLOCKS`, right when no build saw any of them).
    """

    fp32: Any
    amax: Mapping[str, float]
    layers: Sequence[str]
    batch: np.ndarray
    reference: np.ndarray
    target: FidelityTarget = FidelityTarget()
    log: Callable[[str], None] = lambda _: None
    max_rounds: int = 4
    cache: Any = None
    cache_key: str = ""
    u8_ranges: Any = None
    sensitivity_images: int = 8
    unit_of: Callable[[str], str] = lambda name: name
    scores: Any = None
    other_scores: Any = ()
    blocks: tuple = ()
    _per_image: dict[str, np.ndarray] = field(default_factory=dict)

    def units(self) -> dict[str, list[str]]:
        """Layers by fallback unit, in graph order."""
        out: dict[str, list[str]] = {}
        for layer in self.layers:
            out.setdefault(self.unit_of(layer), []).append(layer)
        return out

    def _key(self) -> str:
        return f"{self.cache_key}|images={images_key(self.batch[: self._count()])}"

    def _count(self) -> int:
        return min(len(self.batch), self.sensitivity_images)

    def _cached(self) -> dict[str, np.ndarray]:
        import json
        from pathlib import Path

        if self.cache is None or not Path(self.cache).is_file():
            return {}
        try:
            data = json.loads(Path(self.cache).read_text())
            if data.get("key") == self._key() and set(data["per_image"]) == set(self.units()):
                self.log(f"reusing per-unit sensitivity from {self.cache}")
                return {k: np.asarray(v, np.float64) for k, v in data["per_image"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return {}

    def per_image(self) -> dict[str, np.ndarray]:
        """Per unit, the |score error| on each ranking image, measured once (and kept in ``cache`` when given)."""
        import json

        if not self._per_image:
            self._per_image = self._cached()
        if not self._per_image:
            units = self.units()
            count = self._count()
            self.log(f"measuring the sensitivity of {len(units)} units ({len(self.layers)} layers) on {count} images")
            simulation = SwitchableModel(self.fp32, self.amax, self.layers, self.u8_ranges)
            step = max(1, len(units) // 10)

            def progress(done: int, total: int) -> None:
                if done % step == 0 or done == total:
                    self.log(f"  sensitivity: {done}/{total} units")

            self._per_image = unit_errors(simulation, self.batch[:count], self.reference[:count], units, progress)
            if self.cache is not None:
                from memexport.core.atomic import write_text_atomic

                record = {"key": self._key(), "per_image": {k: v.tolist() for k, v in self._per_image.items()}}
                write_text_atomic(self.cache, json.dumps(record, indent=1))
        return self._per_image

    def sensitivity(self, without: Sequence[int] = ()) -> dict[str, float]:
        """Per-unit sensitivity: the mean over the ranking images, leaving out the evidence images ``without``."""
        per_image = self.per_image()
        keep = np.ones(self._count(), bool)
        keep[[i for i in without if i < keep.size]] = False
        if not keep.any():
            keep[:] = True
        return {unit: float(values[keep].mean()) for unit, values in per_image.items()}

    def order(self, without: Sequence[int] = ()) -> list[str]:
        """Units, most sensitive first, ranked without the evidence images ``without``."""
        sensitivity = self.sensitivity(without)
        return sorted(self.units(), key=lambda unit: -sensitivity[unit])

    def fallback_layers(self, units: int, without: Sequence[int] = ()) -> frozenset:
        """The layers of the ``units`` most sensitive units, ranked without ``without``."""
        layers = self.units()
        return frozenset(layer for unit in self.order(without)[:units] for layer in layers[unit])

    def estimate(self, errors: Sequence[np.ndarray]) -> FidelityEstimate:
        """The fidelity estimate of per-image errors on the evidence."""
        from memexport.calibration.fidelity import estimate_fidelity

        scores = self.reference if self.scores is None else self.scores
        return estimate_fidelity(errors, scores, self.other_scores)

    def run(self, evaluate: Evaluate, what: str, rescore: Any = None, label: str = "", prior: Sequence[Any] = ()) -> tuple[Any, GuardReport]:
        """Estimate with every layer in INT8; while unverified, try keeping the most sensitive units in FP32.

        Args:
            evaluate: Builds the artifact with the given layers in FP32 and returns it with, per
                evidence image, the errors of its views.
            what: Name for messages.
            rescore: ``rescore(exclude, group)``: one evidence group's errors (per evidence image,
                empty outside the group) with ``exclude`` in FP32, for a judged block whose own
                ranking differs (default ``None``: the guard's ranking is used for every block).
            label: Prefix of the candidates' labels (the OpenVINO kind's precision).
            prior: Candidates of an earlier run on the same evidence (another precision) that the
                shipped artifact was chosen against; the nested estimate includes them.

        Returns:
            The best artifact found (the first one unless a step improved on it) and the report,
            whose ``final`` is the nested estimate when anything was chosen.
        """
        from memexport.calibration.selection import Candidate

        def logged(exclude: frozenset, group: int) -> list:
            self.log(f"{what}: scoring evidence group {group} again, its units ranked without its images ({len(exclude)} layer(s) in FP32)")
            return rescore(exclude, group)

        def candidate(units: int, exclude: frozenset) -> tuple[Any, Any]:
            artifact, errors = evaluate(exclude)
            name = f"{label}{units} unit(s) in FP32"
            return artifact, Candidate(name, units, exclude, list(errors), self.estimate(errors), logged if rescore is not None else None)

        proto, first = candidate(0, frozenset())
        initial = first.estimate
        self.log(f"{what}: all layers INT8: {initial.describe()}")
        best, best_units, steps, tried = (proto, first), 0, [], [first]
        if not (initial.verified(self.target) or self.max_rounds <= 0 or not self.layers):
            order = self.order()
            count = 1
            for _ in range(self.max_rounds):
                artifact, step = candidate(count, self.fallback_layers(count))
                tried.append(step)
                taken = step.estimate.better_than(best[1].estimate, self.target)
                self.log(f"{what}: {count} unit(s), {len(step.exclude)} layer(s) in FP32: {step.estimate.describe()}{'' if taken else ' (no better: not taken)'}")
                steps.append(FallbackStep(count, len(step.exclude), step.estimate, taken))
                if taken:
                    best, best_units = (artifact, step), count
                if best[1].estimate.verified(self.target) or count >= len(order):
                    break
                count = min(len(order), count * 2)
        final = self.nested([*prior, *tried], what)
        order_units = tuple(self.order()[:best_units]) if best_units else ()
        fallback = tuple(layer for unit in order_units for layer in self.units()[unit])
        sensitivity = self.sensitivity() if steps else {}
        chosen = best[1].estimate if len(prior) + len(tried) > 1 else None
        return best[0], GuardReport(initial, final if final is not None else best[1].estimate, fallback, sensitivity, self.target,
                                    tuple(steps), order_units, chosen, (*prior, *tried))

    def nested(self, candidates: Sequence[Any], what: str) -> FidelityEstimate | None:
        """The nested estimate over ``candidates`` (``None`` with a single candidate: nothing was chosen)."""
        from memexport.calibration.selection import HELD_OUT_BLOCKS, Block, nested_estimate

        if len(candidates) < 2:
            return None
        scores = np.asarray(self.reference if self.scores is None else self.scores, np.float64)
        blocks = self.blocks or tuple(Block(0, tuple(range(start, len(scores), HELD_OUT_BLOCKS))) for start in range(min(HELD_OUT_BLOCKS, len(scores))))
        estimate, _ = nested_estimate(candidates, blocks, scores, np.asarray(self.other_scores, np.float64), self.target,
                                      lambda block, units: self.fallback_layers(units, block.images))
        self.log(f"{what}: after choosing among {len(candidates)} candidates (nested): {estimate.describe()}")
        return estimate
