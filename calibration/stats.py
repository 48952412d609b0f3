"""Activation statistics gathered on CPU with ONNX Runtime, kept on disk.

One pass over the calibration images records, for every float tensor of the graph, its
minimum, maximum and a histogram of absolute values. Every range method (``minmax``,
``percentile``, ``entropy``) is then computed from these statistics alone, so changing the
method never reads the images again.

Histograms have a fixed number of bins over ``[0, edge]``; when a batch exceeds ``edge`` the
edge doubles and pairs of bins merge, which is exact, so batches can stream in any order.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from memexport.core.atomic import atomic_path
from memexport.runtime.integrity import sha256_file
from memexport.core.errors import ArtifactError, CalibrationError, UsageError

METHODS = ("entropy", "minmax", "percentile")
STATS_VERSION = 1
# Half of 4096 bins stays resolved after an edge doubling: the 2048 TensorRT itself uses.
DEFAULT_BINS = 4096
# Ops whose outputs are metadata (shapes, indices), never activations worth a range.
_SKIP_OPS = frozenset({"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "ConstantOfShape", "Equal", "If", "Cast", "Range", "Size", "NonZero"})


@dataclass
class ActivationStats:
    """Per-tensor activation statistics.

    Attributes:
        names: Tensor names (ONNX names, which TensorRT's ONNX parser keeps).
        minimum: Smallest value seen per tensor.
        maximum: Largest value seen per tensor.
        hist: Histogram of absolute values per tensor, shape ``(tensors, bins)``.
        edge: Upper edge of each histogram.
        images: Images (views, counting augmentation) that went in.
        fingerprint: Identifies the model and image list the statistics came from.
    """

    names: list[str]
    minimum: np.ndarray
    maximum: np.ndarray
    hist: np.ndarray
    edge: np.ndarray
    images: int = 0
    fingerprint: str = ""
    info: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, names: Sequence[str], bins: int = DEFAULT_BINS, fingerprint: str = "") -> "ActivationStats":
        count = len(names)
        return cls(
            list(names), np.full(count, np.inf), np.full(count, -np.inf), np.zeros((count, bins), dtype=np.float64),
            np.zeros(count, dtype=np.float64), 0, fingerprint,
        )

    def update(self, index: int, values: np.ndarray) -> None:
        """Fold one tensor's values into its statistics."""
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        self.minimum[index] = min(self.minimum[index], float(flat.min()))
        self.maximum[index] = max(self.maximum[index], float(flat.max()))
        absolute = np.abs(flat)
        peak = float(absolute.max())
        bins = self.hist.shape[1]
        if peak > self.edge[index]:
            if self.edge[index] == 0:
                self.edge[index] = 2.0 ** math.ceil(math.log2(peak)) if peak > 0 else 0.0
            while peak > self.edge[index]:
                merged = self.hist[index].reshape(-1, 2).sum(axis=1)
                self.hist[index] = np.concatenate([merged, np.zeros(bins // 2)])
                self.edge[index] *= 2.0
        if self.edge[index] == 0:
            self.hist[index, 0] += flat.size
            return
        position = np.minimum((absolute * np.float32(bins / self.edge[index])).astype(np.int64), bins - 1)
        self.hist[index] += np.bincount(position, minlength=bins)

    @classmethod
    def merged(cls, parts: Sequence["ActivationStats"], fingerprint: str = "") -> "ActivationStats":
        """The statistics of the union of ``parts``' images (same tensors, same bins).

        Histograms of a smaller edge are coarsened to the largest edge first (pairs of bins merge,
        exactly as :meth:`update` does when a batch exceeds the edge).
        """
        first = parts[0]
        out = cls.empty(first.names, first.hist.shape[1], fingerprint)
        out.edge = np.max([p.edge for p in parts], axis=0)
        for part in parts:
            hist = part.hist.copy()
            for index in np.flatnonzero(part.edge < out.edge):
                if part.edge[index] == 0:
                    # Every value was exactly 0: all of it lies in the first bin.
                    hist[index] = np.concatenate([[hist[index].sum()], np.zeros(hist.shape[1] - 1)])
                    continue
                for _ in range(int(round(math.log2(out.edge[index] / part.edge[index])))):
                    hist[index] = np.concatenate([hist[index].reshape(-1, 2).sum(axis=1), np.zeros(hist.shape[1] // 2)])
            out.hist += hist
            out.minimum = np.minimum(out.minimum, part.minimum)
            out.maximum = np.maximum(out.maximum, part.maximum)
            out.images += part.images
        return out

    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.minimum), np.abs(self.maximum))

    def save(self, path: Path | str) -> None:
        """Write the statistics as ``.npz`` (atomically)."""
        buffer = io.BytesIO()
        info = {**self.info, "version": STATS_VERSION, "images": self.images, "fingerprint": self.fingerprint}
        np.savez_compressed(
            buffer, names=np.array(self.names, dtype=object).astype(str), minimum=self.minimum, maximum=self.maximum,
            hist=self.hist.astype(np.float64), edge=self.edge, info=np.array(json.dumps(info)),
        )
        with atomic_path(path, suffix=".npz") as tmp:
            tmp.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: Path | str) -> "ActivationStats":
        """Read statistics written by :meth:`save`.

        Raises:
            ArtifactError: Unreadable or from another statistics version.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                info = json.loads(str(data["info"]))
                if info.get("version") != STATS_VERSION:
                    raise ValueError(f"version {info.get('version')}, expected {STATS_VERSION}")
                return cls(
                    [str(n) for n in data["names"]], data["minimum"].copy(), data["maximum"].copy(), data["hist"].copy(),
                    data["edge"].copy(), int(info["images"]), str(info["fingerprint"]), info,
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ArtifactError(f"{path}: unreadable calibration statistics ({exc}); delete the file to gather them again") from None


@dataclass
class FoldedStats:
    """Activation statistics kept per cross-validation fold of the calibration images.

    The artifacts use the statistics of every image (:meth:`all`); the fidelity estimate
    rebuilds each artifact without one fold (:meth:`without`) and scores that fold's images,
    which the rebuilt artifact never saw. One pass over the images serves both.

    Attributes:
        folds: Statistics per fold.
        fingerprint: Identifies the model, the images and their fold assignment.
        info: Free-form record (calibration images, augmentation, source).
    """

    folds: list[ActivationStats]
    fingerprint: str = ""
    info: dict = field(default_factory=dict)
    _all: ActivationStats | None = field(default=None, repr=False, compare=False)

    def all(self) -> ActivationStats:
        """Statistics of every fold together."""
        if self._all is None:
            self._all = ActivationStats.merged(self.folds, self.fingerprint)
            self._all.info = self.info
        return self._all

    def without(self, fold: int) -> ActivationStats:
        """Statistics of every fold but ``fold``."""
        return ActivationStats.merged([part for index, part in enumerate(self.folds) if index != fold], self.fingerprint)

    @property
    def images(self) -> int:
        return sum(part.images for part in self.folds)

    def save(self, path: Path | str) -> None:
        """Write the merged statistics (readable by :meth:`ActivationStats.load`) and the folds, as ``.npz``."""
        merged = self.all()
        buffer = io.BytesIO()
        info = {**self.info, "version": STATS_VERSION, "images": merged.images, "fingerprint": self.fingerprint}
        np.savez_compressed(
            buffer, names=np.array(merged.names, dtype=object).astype(str), minimum=merged.minimum, maximum=merged.maximum,
            hist=merged.hist, edge=merged.edge, info=np.array(json.dumps(info)),
            fold_minimum=np.stack([p.minimum for p in self.folds]), fold_maximum=np.stack([p.maximum for p in self.folds]),
            fold_hist=np.stack([p.hist for p in self.folds]).astype(np.float32), fold_edge=np.stack([p.edge for p in self.folds]),
            fold_images=np.array([p.images for p in self.folds]),
        )
        with atomic_path(path, suffix=".npz") as tmp:
            tmp.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: Path | str) -> "FoldedStats":
        """Read what :meth:`save` wrote.

        Raises:
            ArtifactError: Unreadable, from another version, or without folds.
        """
        merged = ActivationStats.load(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                folds = [
                    ActivationStats(merged.names, data["fold_minimum"][k].copy(), data["fold_maximum"][k].copy(),
                                    data["fold_hist"][k].astype(np.float64), data["fold_edge"][k].copy(), int(data["fold_images"][k]), merged.fingerprint)
                    for k in range(len(data["fold_images"]))
                ]
        except (OSError, KeyError, ValueError) as exc:
            raise ArtifactError(f"{path}: calibration statistics without folds ({exc}); delete the file to gather them again") from None
        out = cls(folds, merged.fingerprint, merged.info)
        out._all = merged
        return out


def fingerprint(model: Path, images: Sequence[Path], **options: object) -> str:
    """A key for (model bytes, image list with sizes and times, options): reuse statistics only when it matches."""
    digest = hashlib.sha256(sha256_file(model).encode())
    for path in images:
        try:
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{path}|missing\n".encode("utf-8", "surrogateescape"))
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def observed_tensors(proto) -> list[str]:
    """The graph's float activations: float graph inputs and float outputs of compute nodes, in graph order."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - fall back to declared types only
        inferred = proto
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers and types.get(i.name) == onnx.TensorProto.FLOAT]
    for node in proto.graph.node:
        if node.op_type in _SKIP_OPS:
            continue
        for output in node.output:
            if output and types.get(output, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT:
                names.append(output)
    return names


class ObservingSession:
    """The FP32 model on ONNX Runtime CPU with every float activation as an output.

    Args:
        model: FP32 ONNX file.
    """

    def __init__(self, model: Path | str) -> None:
        import onnx
        import onnxruntime as ort

        proto = onnx.load(str(model))
        self.names = observed_tensors(proto)
        graph_outputs = {o.name for o in proto.graph.output}
        for name in self.names:
            if name not in graph_outputs:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Basic optimisation only: fusions would hide the very tensors being observed.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def gather(self, stats: ActivationStats, batches: Iterable[np.ndarray], on_batch: Callable[[int], None] = lambda count: None) -> ActivationStats:
        """Fold every activation of ``batches`` into ``stats``; ``on_batch`` gets each batch's size."""
        for batch in batches:
            outputs = self.session.run(self.names, {self.input_name: batch})
            for index, values in enumerate(outputs):
                if isinstance(values, np.ndarray) and values.dtype == np.float32:
                    stats.update(index, values)
            stats.images += int(batch.shape[0])
            on_batch(int(batch.shape[0]))
        return stats


def activation_stats_from_batches(
    model: Path | str,
    batches: Iterable[np.ndarray],
    total: int | None = None,
    progress: Callable[[int, int | None], None] = lambda done, total: None,
    bins: int = DEFAULT_BINS,
    fingerprint_key: str = "",
) -> ActivationStats:
    """Run the FP32 model on CPU over ``batches`` and gather statistics of every float activation.

    Args:
        model: FP32 ONNX file.
        batches: float32 NCHW batches (streamed; each is dropped after use).
        total: Number of images expected, for progress only (default unknown).
        progress: Called with (images done, total) after each batch.
        bins: Histogram bins per tensor (default 4096).
        fingerprint_key: Stored with the statistics (see :func:`fingerprint`).

    Raises:
        CalibrationError: No batch at all.
    """
    return folded_stats_from_batches(model, [batches], total, progress, bins, fingerprint_key).folds[0]


def folded_stats_from_batches(
    model: Path | str,
    folds: Sequence[Iterable[np.ndarray]],
    total: int | None = None,
    progress: Callable[[int, int | None], None] = lambda done, total: None,
    bins: int = DEFAULT_BINS,
    fingerprint_key: str = "",
) -> FoldedStats:
    """:func:`activation_stats_from_batches` with the statistics of each fold's batches kept apart.

    Raises:
        CalibrationError: No batch at all.
    """
    observing = ObservingSession(model)
    done = [0]

    def on_batch(count: int) -> None:
        done[0] += count
        progress(done[0], total)

    parts = [observing.gather(ActivationStats.empty(observing.names, bins, fingerprint_key), batches, on_batch) for batches in folds]
    if done[0] == 0:
        raise CalibrationError(f"{model}: no calibration image could be read; pass a folder of JPEG/PNG images with --images")
    return FoldedStats(parts, fingerprint_key)


def _percentile_amax(hist: np.ndarray, edge: float, percentile: float) -> float:
    total = hist.sum()
    if total <= 0 or edge <= 0:
        return 0.0
    cumulative = np.cumsum(hist) / total
    index = int(np.searchsorted(cumulative, percentile / 100.0))
    return (min(index, hist.size - 1) + 1) * edge / hist.size


def _entropy_amax(hist: np.ndarray, edge: float, levels: int = 128, candidates: int = 384) -> float:
    """TensorRT's entropy (KL-divergence) threshold on a histogram of absolute values."""
    nonzero = np.flatnonzero(hist)
    if nonzero.size == 0 or edge <= 0:
        return 0.0
    width = edge / hist.size
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return last * width
    counts = hist[:last].astype(np.float64).copy()
    # ReLU outputs pile up at exactly zero; like pytorch-quantization, do not let that bin dominate.
    counts[0] = counts[1]
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    stride = max(1, (last - levels) // candidates)
    best, best_i = np.inf, last
    for i in list(range(levels, last, stride)) + [last]:
        head = counts[:i]
        p = head.copy()
        p[-1] += tail[i]
        groups = (np.arange(i) * levels) // i
        present = head > 0
        group_sum = np.bincount(groups, weights=head, minlength=levels)
        group_count = np.bincount(groups, weights=present.astype(np.float64), minlength=levels)
        q = np.where(present, group_sum[groups] / np.maximum(group_count[groups], 1.0), 0.0)
        if p.sum() <= 0 or q.sum() <= 0:
            continue
        p /= p.sum()
        q /= q.sum()
        mask = p > 0
        divergence = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if divergence < best:
            best, best_i = divergence, i
    return best_i * width


def amax_from_stats(stats: ActivationStats, method: str = "entropy", percentile: float = 99.99) -> dict[str, float]:
    """Symmetric dynamic range (``amax``) per tensor by ``method``.

    Args:
        stats: Gathered statistics.
        method: ``entropy`` (TensorRT's KL threshold, default), ``minmax`` (largest |x|) or
            ``percentile`` (the ``percentile``-th percentile of |x|).
        percentile: Used by ``percentile`` (default 99.99).

    Raises:
        UsageError: Unknown method.
    """
    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    absmax = stats.absmax()
    out = {}
    for index, name in enumerate(stats.names):
        if not np.isfinite(absmax[index]):
            continue
        if method == "minmax":
            amax = float(absmax[index])
        elif method == "percentile":
            amax = _percentile_amax(stats.hist[index], float(stats.edge[index]), percentile)
        else:
            amax = _entropy_amax(stats.hist[index], float(stats.edge[index]))
        amax = min(amax, float(absmax[index]))
        out[name] = amax if amax > 0 else 1e-8
    return out


def signed_ranges(stats: ActivationStats, amax: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """Asymmetric ``(low, high)`` per tensor: the observed range clipped to ``[-amax, amax]`` (for U8 activations)."""
    out = {}
    for index, name in enumerate(stats.names):
        if name in amax:
            a = amax[name]
            out[name] = (max(float(stats.minimum[index]), -a), min(float(stats.maximum[index]), a))
    return out
