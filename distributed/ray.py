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

Each actor holds one runner (the artifact is loaded, and its integrity checked, once per actor)
and sizes the back end's threads to its own ``num_cpus``. Actors decode their own rows on a few
threads while the previous batch runs inference, as the local engine does.

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from memexport.core.errors import ArtifactError, InputImageError, MemexportError, UsageError
from memexport.runtime.batch import (
    OLD_DECODE,
    PredictOptions,
    PredictSummary,
    ResultWriter,
    check_same_models,
    check_same_run,
    csv_writer_for_run,
    interrupted,
    plan_job,
    read_scores_file,
    run_label,
    safe_item,
    upfront_failures,
)
from memexport.core.optional import require
from memexport.runtime.integrity import model_not_found
from memexport.runtime.base import UNVERIFIED_SUFFIX, Runner, RunnerOptions
from memexport.runtime.predictor import Predictor, ScoreResult
from memexport.runtime.registry import backend_for, runner_for

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


def pool_for(node_cpus: Sequence[float], total_gpus: float, model: str | os.PathLike, options: RayOptions) -> Pool:
    """Size the actor pool for a cluster (see :class:`RayOptions` for the defaults).

    Args:
        node_cpus: CPUs of each alive node.
        total_gpus: GPUs in the cluster.
        model: The artifact (TensorRT engines get a GPU per actor).
        options: The requested sizes; zeros are filled in.

    Raises:
        UsageError: Negative sizes, or GPU actors on a cluster without GPUs.
    """
    if options.actors < 0 or options.cpus_per_actor < 0 or (options.gpus_per_actor or 0) < 0:
        raise UsageError(f"--actors and --cpus-per-actor must be >= 0, got {options.actors} and {options.cpus_per_actor}")
    gpus = options.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if backend_for(model, options.backend) in GPU_BACKENDS or options.device.startswith("cuda") else 0.0
    if gpus and total_gpus <= 0:
        raise UsageError(f"{model}: needs a GPU per actor but the Ray cluster has none; use an .onnx artifact with --device cpu, or add GPU nodes")
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


def _runner(model: str, options: RayOptions, threads: int) -> Runner:
    shared = RunnerOptions(device=options.device, threads=threads, check_integrity=options.check_integrity)
    return runner_for(model, shared, backend=options.backend, precision=options.precision)


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
    """Ray Data callable class: one runner per actor, scoring one batch of rows per call.

    Calls may run on two threads at once (``max_concurrent_calls_per_actor=2``): one decodes
    its rows while the other runs inference; inference itself is serialised by a lock, so
    the back end has the actor's CPUs to itself. With a ``ledger``, files present at an earlier
    death of an actor are scored one at a time, alone in the actor, and refused after
    ``options.max_worker_deaths`` deaths (see :class:`DeathLedger`).

    Args:
        model: Artifact path, as every node sees it.
        options: See :class:`RayOptions`.
        threads: Back-end and decoding threads (the actor's ``num_cpus``).
        ledger: The job's :class:`DeathLedger` actor handle (default ``None``: no bound).
    """

    def __init__(self, model: str, options: RayOptions, threads: int, ledger: Any = None) -> None:
        import ray

        self.runner = _runner(model, options, threads).__enter__()
        self.predictor = Predictor(self.runner, batch_size=options.batch_size, exif_transpose=options.exif_transpose, decode=options.decode)
        self.decoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memexport-decode")
        self.lock = threading.Lock()
        self.gate = _Gate()
        self.ledger, self.max_deaths = ledger, options.max_worker_deaths
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [_name(path) for path in batch["path"]]
        data = batch.get("bytes")
        raws = [None] * len(names) if data is None else [bytes(raw) for raw in data]
        results: list[Any] = [None] * len(names)
        with self.gate.shared():
            deaths = self._ledger("start", names) if self.ledger is not None else [0] * len(names)
            fresh = [i for i, count in enumerate(deaths) if not count]
            for i, count in enumerate(deaths):
                if count and count >= self.max_deaths > 0:
                    results[i] = ScoreResult(names[i], None, worker_died(names[i], count))
            self._score(names, raws, fresh, results)
        for i, count in enumerate(deaths):
            if count and not count >= self.max_deaths > 0:
                with self.gate.exclusive():  # alone in this actor: a death now is this file's own
                    self._ledger("begin", names[i])
                    self._score(names, raws, [i], results)
        # A refused file stays open in the ledger: a retry of this block refuses it again.
        return self._columns(batch, results)

    def _ledger(self, method: str, argument: Any) -> Any:
        import ray

        return ray.get(getattr(self.ledger, method).remote(argument))

    def _score(self, names: Sequence[str], raws: Sequence[bytes | None], indices: Sequence[int], results: list[Any]) -> None:
        """Decode and score the rows ``indices`` as one batch into ``results``, then close them in the ledger."""
        if not indices:
            return
        predictor = self.predictor

        def decode(i: int) -> Any:
            raw = raws[i]
            return safe_item(names[i], lambda: predictor.preprocess(names[i]) if raw is None else predictor.preprocess_bytes(raw, names[i]))

        items = list(self.decoders.map(decode, indices))
        with self.lock:
            for i, result in zip(indices, predictor.score_batch([(names[i], item) for i, item in zip(indices, items)])):
                results[i] = result
        if self.ledger is not None:
            self._ledger("end", [names[i] for i in indices])

    def _columns(self, batch: dict[str, np.ndarray], results: Sequence[Any]) -> dict[str, np.ndarray]:
        count = len(results)
        out = {key: value for key, value in batch.items() if key != "bytes"}
        out["score"] = np.array([np.nan if r.score is None else r.score for r in results], dtype=np.float64)
        out["error"] = np.array([None if r.error is None else f"{r.error.reason}: {r.error.detail}" for r in results], dtype=object)
        out["model"] = np.full(count, self.predictor.metadata.model, dtype=object)
        out["backend"] = np.full(count, self.runner.backend, dtype=object)
        out["precision"] = np.full(count, self.runner.recorded_precision, dtype=object)
        out["decode"] = np.full(count, self.predictor.decode, dtype=object)
        out["node"] = np.full(count, self.node, dtype=object)
        return out


def cluster_pool(model: str | os.PathLike, options: RayOptions) -> Pool:
    """:func:`pool_for` on the connected Ray cluster's alive nodes."""
    ray = ray_module()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    node_cpus = [float(node.get("Resources", {}).get("CPU", 0)) for node in nodes]
    return pool_for(node_cpus, float(ray.cluster_resources().get("GPU", 0)), model, options)


def scores_dataset(dataset: Any, model: str | os.PathLike, options: RayOptions = RayOptions(), pool: Pool | None = None) -> Any:
    """Score a Ray Dataset of images with an artifact, on a pool of actors.

    Args:
        dataset: Rows with ``path`` (str, or bytes for names that are not UTF-8) and, when the
            files were read by Ray (``ray.data.read_binary_files(..., include_paths=True)``),
            ``bytes``. Without ``bytes`` every node must see ``path`` (shared storage).
        model: The artifact (``.onnx``, a TensorRT engine, or any type the runtime runs), at a
            path every node sees.
        options: See :class:`RayOptions`.
        pool: A pool already sized (default: :func:`cluster_pool` on the connected cluster).

    Returns:
        A lazy Dataset with the input columns (less ``bytes``) plus ``score`` (NaN on failure),
        ``error`` (``"reason: detail"``, or null), ``model``, ``backend``, ``precision``, ``decode`` and ``node`` (the
        Ray node id that scored the row).

    Example:
        >>> files = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
        >>> scores_dataset(files, "/shared/resmem.onnx").write_parquet("s3://bucket/scores/")
    """
    ray = ray_module()
    model = os.path.abspath(model) if "://" not in str(model) else str(model)
    pool = pool or cluster_pool(model, options)
    if options.max_worker_deaths < 0:
        raise UsageError(f"max_worker_deaths must be >= 0 (0: retry for ever), got {options.max_worker_deaths}")
    ledger = _death_ledger(ray) if options.max_worker_deaths else None
    return dataset.map_batches(
        ScoringActor,
        fn_constructor_kwargs={"model": model, "options": options, "threads": pool.threads, "ledger": ledger},
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
        num_cpus=pool.cpus,
        num_gpus=pool.gpus or None,
    )


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
        run: ``(backend, precision, decode)`` written on every row.
    """

    def __init__(self, folder: Path, run: tuple[str, str, str]) -> None:
        self.folder = folder
        self.run = run
        folder.mkdir(parents=True, exist_ok=True)
        self.next = 1 + max((int(p.stem.split("-")[1]) for p in parquet_parts(folder)), default=-1)

    def write(self, rows: Sequence[tuple]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from memexport.core.atomic import atomic_path

        table = pa.table({
            "path": [printable(row[0]) for row in rows],
            "score": pa.array([row[1] for row in rows], pa.float64()),
            "model": [row[2] for row in rows],
            "backend": [self.run[0]] * len(rows),
            "precision": [self.run[1]] * len(rows),
            "decode": [self.run[2]] * len(rows),
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


def prepare_parquet(output: Path, options: PredictOptions, summary: PredictSummary) -> frozenset[str]:
    """The Parquet counterpart of the CSV check: refuse, clear (``overwrite``) or read (``resume``)."""
    from memexport.runtime.batch import path_key

    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: is a file; --format parquet writes a folder of parts, pass a new folder name with -o")
    parts = parquet_parts(output) if output.is_dir() else []
    if not parts:
        return frozenset()
    if options.overwrite:
        for part in parts:
            part.unlink()
        return frozenset()
    if not options.resume:
        raise UsageError(
            f"{output} already holds scores; pass --resume to continue it (already scored images are skipped) or --overwrite to start again"
        )
    return frozenset(path_key(name) for part in parts for name in parquet_names(part))


def parquet_names(part: Path) -> list[str]:
    """The file names a Parquet part scores, exactly: from ``path_bytes``, or from ``path`` in parts
    written before it existed (where a name that is not valid UTF-8 cannot match again)."""
    import pyarrow.parquet as pq

    if "path_bytes" in pq.read_schema(part).names:
        return [os.fsdecode(raw) for raw in pq.read_table(part, columns=["path_bytes"]).column("path_bytes").to_pylist()]
    return pq.read_table(part, columns=["path"]).column("path").to_pylist()


def parquet_models(folder: Path) -> frozenset[str]:
    """The models a Parquet scores folder's rows name."""
    import pyarrow.parquet as pq

    models: set[str] = set()
    for part in parquet_parts(folder) if folder.is_dir() else []:
        if "model" in pq.read_schema(part).names:
            models.update(str(m) for m in pq.read_table(part, columns=["model"]).column("model").to_pylist() if m)
    return frozenset(models)


def parquet_runs(folder: Path) -> frozenset[tuple[str, ...]]:
    """The ``(backend, precision, decode)`` runs a Parquet scores folder holds (parts without a
    ``backend`` column, written before it existed, name none; parts without ``decode`` were exact)."""
    import pyarrow.parquet as pq

    runs: set[tuple[str, ...]] = set()
    for part in parquet_parts(folder) if folder.is_dir() else []:
        names = pq.read_schema(part).names
        if "backend" in names:
            table = pq.read_table(part, columns=[c for c in ("backend", "precision", "decode") if c in names])
            decode = table.column("decode").to_pylist() if "decode" in names else [OLD_DECODE] * table.num_rows
            runs.update(zip(table.column("backend").to_pylist(), table.column("precision").to_pylist(), decode))
    return frozenset(runs)


def writer_for_run(output: Path, options: PredictOptions, summary: PredictSummary, done_keys: frozenset[str],
                   run: tuple[str, str, str], parquet: bool, model: str = "") -> ResultWriter:
    """The local engine's writer (:func:`~memexport.runtime.batch.csv_writer_for_run`) for a CSV;
    for Parquet, the same refusal of another model's, back end's, precision's or decode mode's scores, then its parts."""
    if not parquet:
        return csv_writer_for_run(output, options, summary, done_keys, run, model)
    check_same_models(output, parquet_models(output) if options.resume else (), [model])
    check_same_run(output, parquet_runs(output) if options.resume else (), run)
    summary.model = model
    summary.backend, summary.precision, summary.decode = run
    return ResultWriter(output, summary, append=bool(done_keys) or options.resume, scores=ParquetScores(output, run))


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


def _scored_blocks(ray: Any, model: Path, todo: Sequence[Path], options: RayOptions) -> Iterator[dict[str, np.ndarray]]:
    pool = cluster_pool(model, options)
    items = [{"path": os.fsencode(os.path.abspath(path)), "index": index} for index, path in enumerate(todo)]
    blocks = math.ceil(len(items) / rows_per_block(len(items), pool.actors, options.batch_size))
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    yield from scores_dataset(dataset, model, options, pool).iter_batches(batch_size=None, batch_format="numpy")


def scores_from_images_on_ray(
    model: Path, inputs: Sequence[Path], output: Path, options: PredictOptions = PredictOptions(),
    progress: Callable[[int, int], None] = lambda done, total: None, *,
    ray_options: RayOptions = RayOptions(reserve_cpus=0), address: str | None = None, output_format: str = "csv",
) -> PredictSummary:
    """``memexport predict --engine ray``: score files and folders on Ray into ``output``.

    Same outputs, resume, summary and errors as :func:`memexport.runtime.batch.scores_csv_from_images`;
    rows arrive in the order blocks finish, not input order.

    Args:
        model: Artifact, at a path every node sees.
        inputs: Files and folders (folders recursively, sorted), on storage every node sees.
        output: CSV file, or a folder of Parquet parts with ``output_format="parquet"``.
        options: As for the local engine (``workers`` is unused: actors decode).
        progress: Called with ``(done, total)`` after each block received.
        ray_options: Actor pool (``batch_size``, ``device``, ``exif_transpose`` and
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
                          precision=options.precision or ray_options.precision)
    model, output, summary = Path(model), Path(output), PredictSummary()
    parquet = output_format == "parquet"
    done_keys, collected, todo = plan_job(inputs, output, options, summary, *([prepare_parquet] if parquet else []))
    if todo and not model.is_file():
        raise model_not_found(model)
    started = time.perf_counter()
    writers: list[ResultWriter] = []

    def open_writer(run: tuple[str, str, str], model_name: str) -> ResultWriter:
        # Opened once the run is known (the first block names it) and checked against the output's:
        # a refused resume leaves the scores and errors files as they were.
        writers.append(writer_for_run(output, options, summary, done_keys, run, parquet, model_name))
        writers[0].write([], upfront_failures(collected))
        if run[1].endswith(UNVERIFIED_SUFFIX):  # the actors' runners said why; their lines stay on the nodes
            summary.warnings.append(
                f"warning: {model.name}: the Ray actors computed {run[1]}: outside the precision its calibration verified "
                "(for an INT8 IR verified with BF16: nodes without a BF16 unit); these scores were never measured against FP32"
            )
        return writers[0]

    try:
        if todo:
            with RaySession(address) as ray:
                started = time.perf_counter()
                blocks = _scored_blocks(ray, model, todo, ray_options)
                try:
                    _write_blocks(blocks, todo, open_writer, progress)
                finally:
                    blocks.close()  # stops Ray Data's execution now, while Ray is still up
        if not writers:  # nothing to score: no actor names the run
            open_writer(*_idle_run(output, model, options, parquet))
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
        for writer in writers:
            writer.close()
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _idle_run(output: Path, model: Path, options: PredictOptions, parquet: bool) -> tuple[tuple[str, str, str], str]:
    """The run and model a job with nothing to score names: the resumed output's own when it holds one
    (nothing new is written, so nothing can mix), else the back end with precision ``unknown``."""
    runs: frozenset[tuple[str, ...]] = frozenset()
    models: frozenset[str] = frozenset()
    if options.resume and parquet:
        runs, models = parquet_runs(output), parquet_models(output)
    elif options.resume and output.is_file() and output.stat().st_size:
        state = read_scores_file(output)
        runs, models = state.runs, state.models
    only = next(iter(runs)) if len(runs) == 1 else None
    run = (only[0], only[1], only[2]) if only else (backend_for(model, options.backend), "unknown", options.decode)
    return run, next(iter(models)) if len(models) == 1 else ""


def _write_blocks(blocks: Iterator[dict[str, np.ndarray]], todo: Sequence[Path], open_writer: Callable[[tuple[str, str, str], str], ResultWriter],
                  progress: Callable[[int, int], None]) -> None:
    """Write each block as it arrives; a row whose index is already written is dropped (exactly once).

    The first block names the run (``backend``, ``precision``, ``decode``) and opens the writer with
    ``open_writer``; a block computed by another run (a node with another back end) is refused.
    """
    written = np.zeros(len(todo), dtype=bool)
    done, writer, run = 0, None, None
    for block in blocks:
        runs = set(zip(block["backend"].tolist(), block["precision"].tolist(), block["decode"].tolist()))
        if writer is None and runs:
            run = next(iter(runs))
            writer = open_writer(run, str(block["model"][0]))
        if runs - {run}:
            seen = "; ".join(run_label(r) for r in sorted(runs | {run}))
            raise ArtifactError(f"the Ray actors computed scores with {seen}; one ranking must not mix them; give every node the same back end and artifact")
        scored, failed = [], []
        for index, score, error, model in zip(block["index"], block["score"], block["error"], block["model"]):
            if written[index]:
                continue
            written[index] = True
            name = str(todo[index])
            if not isinstance(error, str):  # null: no error
                scored.append((name, float(score), model))
            else:
                reason, _, detail = str(error).partition(": ")
                failed.append((name, reason, detail))
        if writer is not None:
            writer.write(scored, failed)
        done += len(scored) + len(failed)
        progress(done, len(todo))
