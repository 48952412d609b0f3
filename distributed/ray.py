"""Score image collections on a Ray cluster with Ray Data, with the guarantees of ``predict``.

Two entry points:

* :func:`scores_dataset` maps a Ray Dataset of image paths (column ``path``) or files read by
  ``ray.data.read_binary_files(..., include_paths=True)`` (columns ``path`` and ``bytes``) to a
  Dataset with ``path``, ``score``, ``error``, ``model``, ``backend``, ``precision``, ``decode`` and ``node``, plus any other
  input column (``bytes`` is dropped). Decoding and preprocessing are the runtime's own, per row,
  so a corrupt image becomes an ``error`` row and never fails a block.
* :func:`scores_from_images_on_ray` is ``memexport predict --engine ray``: the same
  ``scores.csv`` / ``scores.errors.csv``, summary and resume as the local engine
  (:mod:`memexport.runtime.batch`), with the scoring spread over a pool of Ray actors.

Each actor holds one runner per model (every artifact is loaded, and its integrity checked, once
per actor) and sizes the back ends' threads to its own ``num_cpus``. Actors decode each row once
for every model (:class:`~memexport.runtime.multi.MultiPredictor`), on a few threads, while the
previous batch runs inference (``pipeline="overlap"``, as the local engine does) or before it
(``"phases"``: one call at a time per actor, decoding with every thread, then scoring). With several
models the output has one row per image and model, and one error row per image that failed.

Exactly once: the driver alone writes the output, one fsynced write per block it receives, and
drops any row whose index it has already written. Ray Data restarts a dead actor and retries its
unfinished blocks (``max_restarts=-1``, ``max_task_retries=-1``), so a lost worker costs a retry,
never a row. An interrupted driver keeps every row written; ``--resume`` skips them before the
read, so each image is scored exactly once over the runs.

Bounded retries: a file that kills its actor every time (a decoder that segfaults, an image that
runs the node out of memory) would be retried forever. A :class:`DeathLedger` counts, per file,
the attempts still open when their actor died. A retried file is scored alone, with no other work
in flight in its actor, so only the culprit is charged again; after ``max_worker_deaths`` deaths it
gets an error row (reason ``worker-died``) instead of another try, and the job finishes.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from memexport.core.errors import ArtifactError, InputImageError, MemexportError, UsageError
from memexport.core.optional import require
from memexport.runtime.base import UNVERIFIED_SUFFIX, RunnerOptions
from memexport.runtime.batch import (
    OLD_DECODE,
    Held,
    ModelArg,
    PredictOptions,
    PredictSummary,
    ResultWriter,
    artifacts_of,
    check_resumable,
    csv_writer_for_run,
    interrupted,
    name_runs,
    path_key,
    pending_images,
    prepare_job,
    run_label,
    upfront_failures,
)
from memexport.runtime.decoding import check_pipeline, safe_item
from memexport.runtime.integrity import model_not_found
from memexport.runtime.peek import recorded_model
from memexport.runtime.multi import Artifact, MultiPredictor, MultiScoreResult
from memexport.runtime.registry import backend_for

RESULT_COLUMNS = ("path", "score", "error", "model", "backend", "precision", "decode", "node")
GPU_BACKENDS = ("tensorrt",)  # back ends that only run on a GPU


def ray_module() -> Any:
    """``import ray`` with Ray Data, or one line saying how to install it (exit code 2)."""
    ray = require("ray", "ray", "scoring with --engine ray")
    require("ray.data", "ray", "scoring with --engine ray")  # the [data] extra: pyarrow, pandas
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How the actor pool is sized and what each actor runs.

    Attributes:
        actors: Actors in the pool; 0 sizes it to the cluster: every node's CPUs (less
            ``reserve_cpus``) divided by ``cpus_per_actor``, or one actor per GPU (default 0).
        cpus_per_actor: Ray CPUs per actor, and the back end's threads; 0 picks the smallest
            node's CPUs less ``reserve_cpus``, at most 4 (1 on GPU actors) (default 0).
        gpus_per_actor: GPUs per actor; ``None`` gives TensorRT engines and ``device`` ``cuda``
            one GPU each, else none (default ``None``).
        backend: Runtime back end (``onnxruntime``, ``openvino``, ``tensorrt``...; default
            ``None``: chosen from the artifact's suffix by the runtime's registry).
        precision: Compute precision where the back end offers a choice (OpenVINO ``fp32`` or
            ``bf16``), as ``predict --precision`` (default ``None``: the back end's default).
        reserve_cpus: CPUs per node left free for the read tasks of the input Dataset. A
            Dataset of paths built with ``from_items`` has none, so the CLI passes 0; with
            ``read_binary_files``, actors that take every CPU starve the reads and the job hangs
            (default 1).
        batch_size: Images per inference call (default 16).
        device: ``cpu``, ``cuda`` or ``auto``, as for ``predict`` (default ``auto``).
        exif_transpose: Honour EXIF orientation (default ``False``, as the original code).
        decode: ``exact`` or ``fast``, as ``predict --decode`` (default ``exact``).
        check_integrity: Verify the artifact's recorded sha256 once per actor (default ``True``).
        max_worker_deaths: Deaths of its actor a file may cause before it gets an error row
            (``worker-died``) instead of another try; 0 retries for ever, as Ray Data alone (default 3).
        pipeline: ``overlap`` (default: two calls in flight per actor, one decoding while the other
            scores) or ``phases`` (one call at a time: its rows decoded with every thread, then scored).
    """

    actors: int = 0
    cpus_per_actor: float = 0
    gpus_per_actor: float | None = None
    backend: str | None = None
    precision: str | None = None
    reserve_cpus: float = 1
    batch_size: int = 16
    device: str = "auto"
    exif_transpose: bool = False
    decode: str = "exact"
    check_integrity: bool = True
    max_worker_deaths: int = 3
    pipeline: str = "overlap"


@dataclass(frozen=True)
class Pool:
    """A sized actor pool: ``actors`` actors of ``cpus`` CPUs and ``gpus`` GPUs each."""

    actors: int
    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        """Back-end threads per actor: its whole CPUs, at least 1."""
        return max(1, int(self.cpus))


def pool_for(node_cpus: Sequence[float], total_gpus: float, model: ModelArg, options: RayOptions) -> Pool:
    """Size the actor pool for a cluster (see :class:`RayOptions` for the defaults).

    Args:
        node_cpus: CPUs of each alive node.
        total_gpus: GPUs in the cluster.
        model: The artifact, or one per model (TensorRT engines get a GPU per actor).
        options: The requested sizes; zeros are filled in.

    Raises:
        UsageError: Negative sizes, or GPU actors on a cluster without GPUs.
    """
    if options.actors < 0 or options.cpus_per_actor < 0 or (options.gpus_per_actor or 0) < 0:
        raise UsageError(f"--actors and --cpus-per-actor must be >= 0, got {options.actors} and {options.cpus_per_actor}")
    gpus = options.gpus_per_actor
    artifacts = artifacts_of(model, options)
    if gpus is None:
        on_gpu = any(backend_for(a.path, a.backend) in GPU_BACKENDS for a in artifacts)
        gpus = 1.0 if on_gpu or options.device.startswith("cuda") else 0.0
    if gpus and total_gpus <= 0:
        named = ", ".join(str(a.path) for a in artifacts)
        raise UsageError(f"{named}: needs a GPU per actor but the Ray cluster has none; use an .onnx artifact with --device cpu, or add GPU nodes")
    free = [max(0.0, cpus - options.reserve_cpus) for cpus in node_cpus]
    usable = [int(c) for c in free if c >= 1]
    # ORT scales sublinearly past ~4 threads: bigger nodes get several actors instead.
    cpus = options.cpus_per_actor or (1.0 if gpus or not usable else float(min(4, min(usable))))
    if options.actors:
        actors = options.actors
    elif gpus:
        actors = max(1, int(total_gpus // gpus))
    else:
        actors = max(1, sum(int(c // cpus) for c in free))
    return Pool(actors, cpus, gpus)


def _name(path: Any) -> str:
    """A path column value (str, or file-system bytes for names that are not UTF-8) as a str."""
    return os.fsdecode(bytes(path)) if isinstance(path, (bytes, np.bytes_)) else str(path)


class DeathLedger:
    """Per file, the attempts that were in flight when their actor died (one ledger per job, as a
    Ray actor; the scoring actors report to it around each piece of work).

    A file is *open* from :meth:`start` or :meth:`begin` until :meth:`end`; an actor that dies
    leaves its files open, so a file's open count is the deaths it was present at.
    """

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def start(self, keys: Sequence[str]) -> list[int]:
        """Each key's deaths so far; keys with none are opened at once (they run in a batch)."""
        counts = [self.open.get(key, 0) for key in keys]
        for key, count in zip(keys, counts):
            if not count:
                self.open[key] = 1
        return counts

    def begin(self, key: str) -> None:
        """Open one more attempt of ``key`` (a retried file, run alone)."""
        self.open[key] = self.open.get(key, 0) + 1

    def end(self, keys: Sequence[str]) -> None:
        """``keys`` finished (scored or refused): they owe no death."""
        for key in keys:
            self.open.pop(key, None)


class _Gate:
    """Shared or exclusive entry: a retried file runs while no other call of its actor is in flight,
    so a death then charges the culprit and no bystander."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.shared_holders = 0
        self.exclusive_held = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self.condition:
            self.condition.wait_for(lambda: not self.exclusive_held)
            self.shared_holders += 1
        try:
            yield
        finally:
            with self.condition:
                self.shared_holders -= 1
                self.condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self.condition:
            self.condition.wait_for(lambda: not self.exclusive_held and not self.shared_holders)
            self.exclusive_held = True
        try:
            yield
        finally:
            with self.condition:
                self.exclusive_held = False
                self.condition.notify_all()


def worker_died(name: str, deaths: int) -> InputImageError:
    """The error row of a file whose actor died ``deaths`` times while scoring it."""
    return InputImageError(name, "worker-died", f"worker died {deaths} times on this file (a crash in its decoder, or out of memory); not tried again")


class ScoringActor:
    """Ray Data callable class: one runner per model per actor, scoring one batch of rows per call.

    Calls may run on two threads at once (``max_concurrent_calls_per_actor=2``, ``pipeline``
    ``overlap``): one decodes its rows while the other runs inference; inference itself is serialised
    by a lock, so the back ends have the actor's CPUs to themselves. Each row is decoded once for every
    model. With a ``ledger``, files present at an earlier death of an actor are scored one at a time,
    alone in the actor, and refused after ``options.max_worker_deaths`` deaths (see :class:`DeathLedger`).

    Rows may carry ``skip``: the models (comma-separated) that already scored that file (a resumed run).

    Args:
        model: Artifact path as every node sees it, an :class:`~memexport.runtime.multi.Artifact`, or a
            list of them (one per model).
        options: See :class:`RayOptions`.
        threads: Back-end and decoding threads (the actor's ``num_cpus``).
        ledger: The job's :class:`DeathLedger` actor handle (default ``None``: no bound).
    """

    def __init__(self, model: ModelArg, options: RayOptions, threads: int, ledger: Any = None) -> None:
        import ray

        shared = RunnerOptions(device=options.device, threads=threads, check_integrity=options.check_integrity)
        with ExitStack() as opened:
            runners = [opened.enter_context(artifact.runner(shared)) for artifact in artifacts_of(model, options)]
            self.multi = MultiPredictor(runners, options.batch_size, exif_transpose=options.exif_transpose, decode=options.decode)
            self._owned = opened.pop_all()  # the runners live as long as the actor
        self.runners = self.multi.runners
        self.decoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memexport-decode")
        self.lock = threading.Lock()
        self.gate = _Gate()
        self.ledger, self.max_deaths = ledger, options.max_worker_deaths
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [_name(path) for path in batch["path"]]
        data = batch.get("bytes")
        raws = [None] * len(names) if data is None else [bytes(raw) for raw in data]
        skips = [frozenset(filter(None, str(text).split(","))) for text in batch["skip"]] if "skip" in batch else [frozenset()] * len(names)
        results: list[Any] = [None] * len(names)
        with self.gate.shared():
            deaths = self._ledger("start", names) if self.ledger is not None else [0] * len(names)
            fresh = [i for i, count in enumerate(deaths) if not count]
            for i, count in enumerate(deaths):
                if count and count >= self.max_deaths > 0:
                    results[i] = MultiScoreResult(names[i], {}, worker_died(names[i], count))
            self._score(names, raws, skips, fresh, results)
        for i, count in enumerate(deaths):
            if count and not count >= self.max_deaths > 0:
                with self.gate.exclusive():  # alone in this actor: a death now is this file's own
                    self._ledger("begin", names[i])
                    self._score(names, raws, skips, [i], results)
        # A refused file stays open in the ledger: a retry of this block refuses it again.
        return self._columns(batch, results, skips)

    def _ledger(self, method: str, argument: Any) -> Any:
        import ray

        return ray.get(getattr(self.ledger, method).remote(argument))

    def _score(self, names: Sequence[str], raws: Sequence[bytes | None], skips: Sequence[frozenset[str]], indices: Sequence[int],
               results: list[Any]) -> None:
        """Decode the rows ``indices`` once, score them as one batch per model that lacks them into
        ``results``, then close them in the ledger."""
        if not indices:
            return
        multi = self.multi

        def decode(i: int) -> Any:
            raw = raws[i]
            return safe_item(names[i], lambda: multi.preprocess(names[i]) if raw is None else multi.preprocess_bytes(raw, names[i]))

        items = list(self.decoders.map(decode, indices))
        with self.lock:
            scored = multi.score_batch(list(zip(indices, items)), lambda i, model: model not in skips[i])  # type: ignore[index]
            for i, result in zip(indices, scored):
                results[i] = result
        if self.ledger is not None:
            self._ledger("end", [names[i] for i in indices])

    def _columns(self, batch: dict[str, np.ndarray], results: Sequence[Any], skips: Sequence[frozenset[str]]) -> dict[str, np.ndarray]:
        """One output row per input row and model that scored it, and one per input row that failed
        (its ``model`` names the models it was for, comma-separated; its run is the first one's)."""
        rows: list[tuple[int, float, str | None, str]] = []
        for i, result in enumerate(results):
            if result.error is not None:
                lacking = [m for m in self.multi.names if m not in skips[i]] or list(self.multi.names)
                rows.append((i, np.nan, f"{result.error.reason}: {result.error.detail}", ",".join(lacking)))
            rows.extend((i, score, None, model) for model, score in result.scores.items())
        take = np.array([row[0] for row in rows], dtype=np.int64)
        out = {key: np.asarray(value)[take] for key, value in batch.items() if key not in ("bytes", "skip")}
        out["score"] = np.array([row[1] for row in rows], dtype=np.float64)
        out["error"] = np.array([row[2] for row in rows], dtype=object)
        out["model"] = np.array([row[3] for row in rows], dtype=object)
        runners = [self.runners[row[3].split(",")[0]] for row in rows]
        out["backend"] = np.array([runner.backend for runner in runners], dtype=object)
        out["precision"] = np.array([runner.recorded_precision for runner in runners], dtype=object)
        out["decode"] = np.full(len(rows), self.multi.decode, dtype=object)
        out["node"] = np.full(len(rows), self.node, dtype=object)
        return out


def cluster_pool(model: ModelArg, options: RayOptions) -> Pool:
    """:func:`pool_for` on the connected Ray cluster's alive nodes."""
    ray = ray_module()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    node_cpus = [float(node.get("Resources", {}).get("CPU", 0)) for node in nodes]
    return pool_for(node_cpus, float(ray.cluster_resources().get("GPU", 0)), model, options)


def scores_dataset(dataset: Any, model: ModelArg, options: RayOptions = RayOptions(), pool: Pool | None = None) -> Any:
    """Score a Ray Dataset of images with an artifact (or several, one per model), on a pool of actors.

    Args:
        dataset: Rows with ``path`` (str, or bytes for names that are not UTF-8) and, when the
            files were read by Ray (``ray.data.read_binary_files(..., include_paths=True)``),
            ``bytes``. Without ``bytes`` every node must see ``path`` (shared storage). An optional
            ``skip`` column names, comma-separated, the models that need not score that row.
        model: The artifact (``.onnx``, a TensorRT engine, or any type the runtime runs), at a
            path every node sees; or a list of them (paths or
            :class:`~memexport.runtime.multi.Artifact`), one per model, each row decoded once for all.
        options: See :class:`RayOptions`.
        pool: A pool already sized (default: :func:`cluster_pool` on the connected cluster).

    Returns:
        A lazy Dataset with the input columns (less ``bytes`` and ``skip``) plus ``score`` (NaN on failure),
        ``error`` (``"reason: detail"``, or null), ``model``, ``backend``, ``precision``, ``decode`` and ``node`` (the
        Ray node id that scored the row): one row per input row and model, or one error row per input
        row that failed (its ``model`` names the models it was for, comma-separated).

    Example:
        >>> files = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
        >>> scores_dataset(files, "/shared/resmem.onnx").write_parquet("s3://bucket/scores/")
        >>> scores_dataset(files, ["/shared/resmem.onnx", "/shared/falseresmem.onnx"]).write_parquet("s3://bucket/both/")
    """
    ray = ray_module()
    model = _absolute(model)
    pool = pool or cluster_pool(model, options)
    if options.max_worker_deaths < 0:
        raise UsageError(f"max_worker_deaths must be >= 0 (0: retry for ever), got {options.max_worker_deaths}")
    ledger = _death_ledger(ray) if options.max_worker_deaths else None
    # Overlap: one call decodes while the other scores. Phases: one call at a time, so an actor's
    # rows are decoded with every thread and then scored with every core, never both at once.
    calls = 2 if check_pipeline(options.pipeline) == "overlap" else 1
    return dataset.map_batches(
        ScoringActor,
        fn_constructor_kwargs={"model": model, "options": options, "threads": pool.threads, "ledger": ledger},
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True),
        num_cpus=pool.cpus,
        num_gpus=pool.gpus or None,
    )


def _absolute(model: ModelArg) -> ModelArg:
    """Artifact paths made absolute, as every node must see them (URLs such as ``s3://`` kept as given)."""
    def one(path: Any) -> Any:
        return os.path.abspath(path) if "://" not in str(path) else str(path)

    if isinstance(model, (str, os.PathLike, Artifact)):
        return Artifact(one(model.path), model.backend, model.precision) if isinstance(model, Artifact) else one(model)
    return [_absolute(m) for m in model]


def _death_ledger(ray: Any) -> Any:
    """The job's :class:`DeathLedger` actor: on the driver's node (a lost worker node must not take it
    along), no CPU taken from the scoring actors, restarted if it dies (its counts then start again).
    It lives as long as the Dataset holds its handle."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here)(DeathLedger).remote()


# --------------------------------------------------------------------------- the predict job


class ParquetScores:
    """Scores as a folder of Parquet parts (``path``, ``score``, ``model``, ``backend``,
    ``precision``, ``decode``, ``path_bytes``), for collections too big for one CSV. Each part is written to a
    temporary name, fsynced and renamed, so a crash never leaves a torn part.

    ``path`` is a string for people and tools (Parquet strings are UTF-8, so a name that is not
    valid UTF-8 shows its odd bytes as ``\\xNN`` escapes); ``path_bytes`` holds the name's exact
    bytes, which ``resume`` matches, so every name round-trips.

    Args:
        folder: The folder of parts.
        runs: ``(backend, precision, decode)`` by model, for rows that do not carry their own
            (default none), as :class:`~memexport.runtime.batch.CsvScores`.
    """

    def __init__(self, folder: Path, runs: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.folder = folder
        self.runs = dict(runs or {})
        folder.mkdir(parents=True, exist_ok=True)
        self.next = 1 + max((int(p.stem.split("-")[1]) for p in parquet_parts(folder)), default=-1)

    def write(self, rows: Sequence[tuple]) -> None:
        """Write ``(path, score, model[, run])`` rows as one part."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from memexport.core.atomic import atomic_path

        runs = [row[3] if len(row) > 3 else self.runs.get(row[2], ("", "", "")) for row in rows]
        table = pa.table({
            "path": [printable(row[0]) for row in rows],
            "score": pa.array([row[1] for row in rows], pa.float64()),
            "model": [row[2] for row in rows],
            "backend": [run[0] for run in runs],
            "precision": [run[1] for run in runs],
            "decode": [run[2] for run in runs],
            "path_bytes": pa.array([os.fsencode(row[0]) for row in rows], pa.binary()),
        })
        with atomic_path(self.folder / f"part-{self.next:06d}.parquet", suffix=".parquet") as temporary:
            pq.write_table(table, temporary)
        self.next += 1

    def close(self) -> None:
        pass


def printable(path: str) -> str:
    """A path as valid UTF-8: odd bytes of a non-UTF-8 name become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def parquet_parts(folder: Path) -> list[Path]:
    """The finished parts of a Parquet scores folder, in order."""
    return sorted(p for p in folder.glob("part-*.parquet") if p.stem.split("-")[1].isdigit())


def prepare_parquet(output: Path, options: PredictOptions, summary: PredictSummary) -> Held:
    """The Parquet counterpart of the CSV check: refuse, clear (``overwrite``) or read (``resume``)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: is a file; --format parquet writes a folder of parts, pass a new folder name with -o")
    parts = parquet_parts(output) if output.is_dir() else []
    if not parts:
        return Held()
    if options.overwrite:
        for part in parts:
            part.unlink()
        return Held()
    if not options.resume:
        raise UsageError(
            f"{output} already holds scores; pass --resume to continue it (already scored images are skipped) or --overwrite to start again"
        )
    return parquet_held(output)


def parquet_names(part: Path) -> list[str]:
    """The file names a Parquet part scores, exactly: from ``path_bytes``, or from ``path`` in parts
    written before it existed (where a name that is not valid UTF-8 cannot match again)."""
    import pyarrow.parquet as pq

    if "path_bytes" in pq.read_schema(part).names:
        return [os.fsdecode(raw) for raw in pq.read_table(part, columns=["path_bytes"]).column("path_bytes").to_pylist()]
    return pq.read_table(part, columns=["path"]).column("path").to_pylist()


def parquet_held(folder: Path) -> Held:
    """What a Parquet scores folder holds (:class:`~memexport.runtime.batch.Held`): parts without a
    ``model`` column name none; without ``backend``, no run; without ``decode``, exact decoding."""
    import pyarrow.parquet as pq

    scored: set[tuple[str, str]] = set()
    model_runs: set[tuple[str, tuple[str, ...]]] = set()
    named = True
    for part in parquet_parts(folder) if folder.is_dir() else []:
        columns = pq.read_schema(part).names
        table = pq.read_table(part, columns=[c for c in ("model", "backend", "precision", "decode") if c in columns])
        names = parquet_names(part)
        count = len(names)
        models = [str(m or "") for m in table.column("model").to_pylist()] if "model" in columns else [""] * count
        named = named and "model" in columns
        scored.update(zip((path_key(name) for name in names), models))
        if "backend" in columns:
            decode = table.column("decode").to_pylist() if "decode" in columns else [OLD_DECODE] * count
            runs = zip(table.column("backend").to_pylist(), table.column("precision").to_pylist(), decode)
            model_runs.update((model, tuple(run)) for model, run in zip(models, runs))
    return Held(frozenset(scored), frozenset(model_runs), named)


def writer_for_run(output: Path, options: PredictOptions, summary: PredictSummary, held: Held,
                   runs: Mapping[str, tuple[str, str, str]], parquet: bool, models: Sequence[str] | None = None) -> ResultWriter:
    """The local engine's writer (:func:`~memexport.runtime.batch.csv_writer_for_run`) for a CSV;
    for Parquet, the same refusal of another model's, back end's, precision's or decode mode's scores, then its parts."""
    if not parquet:
        return csv_writer_for_run(output, options, summary, held, runs, models)
    check_resumable(output, parquet_held(output) if options.resume else Held(), runs, models)
    name_runs(summary, runs)
    return ResultWriter(output, summary, append=bool(held.scored) or options.resume, scores=ParquetScores(output, runs))


def _quiet_ray() -> dict[str, Any]:
    """``ray.init`` arguments and log levels that keep the terminal to memexport's own lines:
    Ray's banners and notices are turned down (errors still raise)."""
    import logging

    return {"logging_level": logging.ERROR, "log_to_driver": False}


class RaySession:
    """Connects to ``address`` (``auto``, ``host:port``, ``ray://...``), or starts a local Ray
    instance sized to this machine when ``address`` is ``None``; reuses one already connected.
    Ray Data's own progress bars and banners are turned off: the caller shows progress."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.owned = False

    def __enter__(self) -> Any:
        ray = ray_module()
        if not ray.is_initialized():
            args = _quiet_ray()
            args.update({"address": self.address} if self.address else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False})
            try:
                ray.init(**args)
            except ConnectionError as exc:
                raise UsageError(f"cannot connect to the Ray cluster at {self.address} ({exc}); check --ray-address (`ray status` on the head node)") from None
            self.owned = True
        import logging

        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its banners and "progress bars disabled" notice
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        return ray

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            ray_module().shutdown()


def _memexport_error(error: BaseException) -> MemexportError | None:
    """The memexport error inside a Ray exception (a failed actor or task wraps it), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemexportError):
            return error
        error = getattr(error, "cause", None) or error.__cause__  # type: ignore[assignment]
    return None


def rows_per_block(count: int, actors: int, batch_size: int) -> int:
    """Rows per input block: about four blocks per actor, each one to eight batches, so every
    actor stays busy, progress moves, and a lost actor redoes little."""
    rows = math.ceil(count / max(1, 4 * actors))
    return batch_size * min(8, max(1, math.ceil(rows / batch_size)))


def _scored_blocks(ray: Any, model: ModelArg, todo: Sequence[Path], options: RayOptions,
                   skips: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    pool = cluster_pool(model, options)
    items = [{"path": os.fsencode(os.path.abspath(path)), "index": index, **({"skip": skips[index]} if skips else {})}
             for index, path in enumerate(todo)]
    blocks = math.ceil(len(items) / rows_per_block(len(items), pool.actors, options.batch_size))
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    yield from scores_dataset(dataset, model, options, pool).iter_batches(batch_size=None, batch_format="numpy")


def scores_from_images_on_ray(
    model: ModelArg, inputs: Sequence[Path], output: Path, options: PredictOptions = PredictOptions(),
    progress: Callable[[int, int], None] = lambda done, total: None, *,
    ray_options: RayOptions = RayOptions(reserve_cpus=0), address: str | None = None, output_format: str = "csv",
) -> PredictSummary:
    """``memexport predict --engine ray``: score files and folders on Ray into ``output``.

    Same outputs, resume, summary and errors as :func:`memexport.runtime.batch.scores_csv_from_images`;
    rows arrive in the order blocks finish, not input order.

    Args:
        model: Artifact, at a path every node sees, or a list of them (one per model; paths or
            :class:`~memexport.runtime.multi.Artifact`): each actor loads every model and decodes each image once.
        inputs: Files and folders (folders recursively, sorted), on storage every node sees.
        output: CSV file, or a folder of Parquet parts with ``output_format="parquet"``.
        options: As for the local engine (``workers`` is unused: actors decode).
        progress: Called with ``(done, total)`` images after each block received.
        ray_options: Actor pool (``batch_size``, ``device``, ``exif_transpose``, ``decode``, ``pipeline`` and
            ``check_integrity`` come from ``options``).
        address: Ray cluster to connect to (default: a local instance sized to this machine).
        output_format: ``csv`` or ``parquet`` (default ``csv``).

    Raises:
        UsageError, ArtifactError, BackendUnavailableError: As the local engine, plus Ray missing.
        Interrupted: Ctrl-C or SIGTERM; every row received is on disk; rerun with ``resume``.
    """
    from dataclasses import replace

    if output_format not in ("csv", "parquet"):
        raise UsageError(f"--format must be csv or parquet, got {output_format!r}")
    ray_module()  # before touching the output: one clear line when Ray is missing
    ray_options = replace(ray_options, batch_size=options.batch_size, device=options.device, exif_transpose=options.exif_transpose, decode=options.decode,
                          check_integrity=options.check_integrity, backend=options.backend or ray_options.backend,
                          precision=options.precision or ray_options.precision, pipeline=options.pipeline)
    artifacts = artifacts_of(model, ray_options)
    output, summary, parquet = Path(output), PredictSummary(pipeline=options.pipeline), output_format == "parquet"
    held = prepare_job(output, options, summary, *([prepare_parquet] if parquet else []))
    names = _model_names(artifacts)
    if names:  # the set of models is known here: a file holding another model is refused before Ray starts
        check_resumable(output, held, {}, names)
    collected, todo = pending_images(inputs, options, summary, held, names)
    for artifact in artifacts if todo else []:
        if not Path(artifact.path).is_file():
            raise model_not_found(Path(artifact.path))
    sink = _RayOutput(output, options, summary, held, collected, artifacts, names, parquet)
    started = time.perf_counter()
    try:
        if todo:
            with RaySession(address) as ray:
                started = time.perf_counter()
                blocks = _scored_blocks(ray, artifacts if len(artifacts) > 1 else artifacts[0], todo, ray_options, _skips(held, todo, names))
                try:
                    _write_blocks(blocks, todo, sink, progress)
                finally:
                    blocks.close()  # stops Ray Data's execution now, while Ray is still up
        sink.finish()
    except KeyboardInterrupt:
        raise interrupted(summary, output, started) from None
    except MemexportError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps a failed actor's error; show ours, as one line
        inner = _memexport_error(exc)
        if inner is None:
            raise
        raise inner from None
    finally:
        sink.close()
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _model_names(artifacts: Sequence[Artifact]) -> list[str] | None:
    """The model each artifact records, read on the driver without loading it, so that a resumed run
    sends each image only to the models that lack it. ``None`` for one artifact whose name cannot be
    read here (its actors name it; a resume then skips any image the output holds).

    Raises:
        ArtifactError: Several artifacts and one is missing or records no model name.
    """
    names = [recorded_model(artifact.path) for artifact in artifacts]
    if len(artifacts) == 1:
        return None if names[0] is None else names
    for artifact, name in zip(artifacts, names):
        if name is None:
            if not Path(artifact.path).is_file():
                raise model_not_found(Path(artifact.path))
            raise ArtifactError(f"{artifact.path}: records no memexport model name, so its scores cannot be told from the other models'; "
                                "re-export it with `memexport export`")
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise UsageError(f"two artifacts of model {twice!r} given; one CSV row per image and model, so pass one artifact per model")
    return names  # type: ignore[return-value]


def _skips(held: Held, todo: Sequence[Path], names: Sequence[str] | None) -> list[str] | None:
    """For a resumed run of several models, per image of ``todo``, the models (comma-separated) that already
    scored it; ``None`` when every model scores every image."""
    if not held.scored or not names or len(names) < 2:
        return None
    done = {name: held.keys_of(name) for name in names}
    keys = [path_key(path) for path in todo]
    return [",".join(name for name in names if key in done[name]) for key in keys]


class _RayOutput:
    """The driver's side of the output: it opens the writer once the actors have named what they compute
    (the first scores to arrive), checks every model's run against the output and against every other
    block, and holds back failures met before any run was named.

    Args:
        output, options, summary, held, collected: As for the local engine's writer.
        artifacts: The job's artifacts; ``names`` the models they record (``None``: not known yet).
        parquet: Write Parquet parts instead of a CSV.
    """

    def __init__(self, output: Path, options: PredictOptions, summary: PredictSummary, held: Held, collected: Any,
                 artifacts: Sequence[Artifact], names: Sequence[str] | None, parquet: bool) -> None:
        self.output, self.options, self.summary, self.held, self.collected = output, options, summary, held, collected
        self.artifacts, self.names, self.parquet = artifacts, names, parquet
        self.runs: dict[str, tuple[str, str, str]] = {}
        self.writer: ResultWriter | None = None
        self.waiting: list[tuple[str, str, str]] = []

    def write(self, scored: Sequence[tuple], failed: Sequence[tuple[str, str, str]], named: Sequence[tuple[str, tuple]] = ()) -> None:
        """Check the ``(model, run)`` pairs a block's rows name (``named``; an error row names its first
        model's), then write its ``(path, score, model, run)`` rows and its failures."""
        self._accept(named)
        self.waiting.extend(failed)
        if self.writer is None and self.runs:
            self._open(self.runs)
        if self.writer is not None and (scored or self.waiting):
            self.writer.write(scored, self.waiting)
            self.waiting = []

    def _accept(self, named: Sequence[tuple[str, tuple]]) -> None:
        seen: dict[str, set[tuple[str, str, str]]] = {}
        for model, run in named:
            seen.setdefault(model, set()).add(tuple(run))  # type: ignore[arg-type]
        for model, runs in seen.items():
            every = runs | ({self.runs[model]} if model in self.runs else set())
            if len(every) > 1:
                labels = "; ".join(run_label(r) for r in sorted(every))
                whose = f"{model} scores" if self.names and len(self.names) > 1 else "scores"
                raise ArtifactError(f"the Ray actors computed {whose} with {labels}; one ranking must not mix them; "
                                    "give every node the same back end and artifact")
        new = {model: next(iter(runs)) for model, runs in seen.items() if model not in self.runs}
        if new and self.writer is not None:  # a model named after the writer opened: checked alike
            check_resumable(self.output, self.held, new, self.names)
            name_runs(self.summary, new)
        self.runs.update(new)
        for model, run in new.items():
            if run[1].endswith(UNVERIFIED_SUFFIX):  # the actors' runners said why; their lines stay on the nodes
                self.summary.warnings.append(
                    f"warning: {model}: the Ray actors computed {run[1]}: outside the precision its calibration verified "
                    "(for an INT8 IR verified with BF16: nodes without a BF16 unit); these scores were never measured against FP32"
                )

    def _open(self, runs: Mapping[str, tuple[str, str, str]]) -> None:
        # Opened once runs are known and checked against the output's: a refused resume leaves the
        # scores and errors files as they were.
        self.writer = writer_for_run(self.output, self.options, self.summary, self.held, runs, self.parquet, self.names)
        self.writer.write([], upfront_failures(self.collected))

    def finish(self) -> None:
        """Open the writer if no scores named a run (nothing to score, or every image failed), write what
        waits, and list the models in the artifacts' order."""
        if self.writer is None:
            self._open(_idle_runs(self.held, self.artifacts, self.names, self.options))
        if self.waiting:
            self.write([], [])
        order = list(self.names or ())
        runs = dict(sorted(self.summary.runs.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
        self.summary.runs.clear()
        name_runs(self.summary, runs)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _idle_runs(held: Held, artifacts: Sequence[Artifact], names: Sequence[str] | None, options: PredictOptions) -> dict[str, tuple[str, str, str]]:
    """The runs a job with no scores names (nothing new is written, so nothing can mix): each model's own
    in the resumed output when it holds one, else its back end with precision ``unknown``."""
    runs = {}
    for artifact, name in zip(artifacts, names or [None] * len(artifacts)):
        model = name if name is not None else (next(iter(held.models)) if len(held.models) == 1 else "")
        own = held.runs_of(model)
        only = next(iter(own)) if len(own) == 1 else None
        runs[model] = (only[0], only[1], only[2]) if only else (backend_for(artifact.path, artifact.backend), "unknown", options.decode)
    return runs


def _write_blocks(blocks: Iterator[dict[str, np.ndarray]], todo: Sequence[Path], sink: _RayOutput, progress: Callable[[int, int], None]) -> None:
    """Write each block as it arrives; a row already written (same image and model, or the same image's
    error) is dropped, so each is written exactly once whatever Ray retries."""
    columns: dict[str, int] = {}
    written = np.zeros((len(todo), 0), dtype=bool)
    seen = np.zeros(len(todo), dtype=bool)
    done = 0
    for block in blocks:
        scored, failed, named = [], [], set()
        for index, score, error, model, *run in zip(block["index"], block["score"], block["error"], block["model"],
                                                    block["backend"], block["precision"], block["decode"]):
            failure = isinstance(error, str)  # null: no error
            named.add((str(model).split(",")[0], tuple(str(part) for part in run)))
            key = "" if failure else str(model)
            if key not in columns:
                columns[key] = len(columns)
                written = np.hstack([written, np.zeros((len(todo), 1), dtype=bool)])
            if written[index, columns[key]]:
                continue
            written[index, columns[key]] = True
            done += not seen[index]
            seen[index] = True
            name = str(todo[index])
            if failure:
                reason, _, detail = str(error).partition(": ")
                failed.append((name, reason, detail))
            else:
                scored.append((name, float(score), key, tuple(str(part) for part in run)))
        sink.write(scored, failed, sorted(named))
        progress(done, len(todo))
