"""Scoring many files to CSV: parallel decoding, incremental crash-safe output, resume.

Guarantees, whatever happens to the process:

* Each batch's rows reach ``scores.csv`` in one ``write`` followed by ``flush`` and ``fsync``,
  so a crash, Ctrl-C or ``kill -9`` keeps every batch finished before it. A tear can only cut
  the last row; ``resume`` drops it (every complete row ends with ``\\n``).
* ``resume`` skips images whose path already has a complete row, so a killed run continued
  with ``resume`` scores every image exactly once. With several models it skips, per model, the
  images that model already scored (a file of a subset of the run's models resumes; one holding a
  model the run does not score is refused), and decodes an image when any model still lacks it.
* A bad input never stops the run: it gets one ``path,error`` row in ``<stem>.errors.csv``
  (one per image, however many models score it),
  written incrementally the same way. Errors are recomputed on every run (resumed or not):
  images that failed are retried, so that file always lists the current failures once each.
* Every row names the model, back end, precision and decode mode that computed its score
  (``path,model,score,backend,precision,decode``: one row per image and model, so a file of several
  models is the same format and ``pandas.pivot`` gives the wide table), and ``resume`` refuses to
  continue a file of another model, back end, precision or decode mode, so one ranking never mixes
  two models' outputs, FP32 and BF16 scores, or exact and fast decoding. Files written before the
  model column existed (``path,score``, ``path,score,backend,precision`` and
  ``path,score,backend,precision,decode``) stay readable and resume in their own columns, as the
  model of the artifact given; those without ``decode`` resume as ``exact``.
* Paths are written absolute (``os.path.abspath``: the inputs' own names, symlinks kept), so
  ``resume`` matches the same files from any working directory; a name that is not valid UTF-8
  is written back as its original bytes (Python's ``surrogateescape``), so the CSV names the
  real file and reads back as the same name. Rows written relative by older versions are still
  read against the current directory.

Decoding runs in a pool of threads (Pillow and numpy release the GIL while decoding and
resizing) that overlaps inference or alternates with it (:mod:`memexport.runtime.decoding`,
``PredictOptions.pipeline``); each worker decodes and resizes one image at a time, once for every
model, down to each model's input (227x227: 0.6 MB a model), so at most
``2 * batch_size + 4 * workers`` images' inputs wait in memory plus one full-size decode per worker
(49 MB for a 12 MP photo decoded exactly: Pillow keeps RGB in 4 bytes a pixel; 3 MB with
``decode="fast"``), whatever the folder's size. Cores are shared between decoding and the back end by
:func:`split_cpus`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections import Counter
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TextIO, Union

from memexport.core.atomic import fsync_dir
from memexport.core.errors import Interrupted, UsageError
from memexport.runtime.base import RunnerOptions
from memexport.runtime.decoding import check_pipeline, decoded_batches
from memexport.runtime.files import Collected, collect_images
from memexport.runtime.multi import Artifact, MultiPredictor
from memexport.runtime.preprocess import check_decode

SCORES_HEADER = ("path", "score")
# What computed each score, after the two columns every reader relies on.
RUN_COLUMNS = ("backend", "precision", "decode")
# The run columns before --decode existed: those rows were all decoded exactly.
OLD_RUN_COLUMNS = ("backend", "precision")
OLD_DECODE = "exact"
# Every new file: one row per image and model.
CSV_HEADER = ("path", "model", "score", *RUN_COLUMNS)
ERRORS_HEADER = ("path", "error")
_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}


def default_workers() -> int:
    """Decoding threads: one per core, at most 8 (default for ``--workers``; see :func:`split_cpus`)."""
    return split_cpus()[0]


def split_cpus(cpus: int | None = None) -> tuple[int, int]:
    """``(decoding threads, back-end threads)`` for a machine of ``cpus`` cores (default: this one's).

    The rule: both stages get every core, and the bounded queue between them hands the cores
    over. Decoding and inference are both CPU-bound, so on C cores the best a pipeline can do is
    ``1 / (1/model + 1/decode)`` (each stage's images/s on all C cores). A fixed partition into
    whole cores cannot reach it when the two costs are not in proportion to whole cores: on 2
    cores, 1 + 1 gives ``min(model, decode) / 2`` (INT8 IR 29.1 and fast decoding ~100 images/s
    alone: 14.6, against a bound of 22.5). Shared, each stage runs whenever the other waits: when
    the queue is full the decoders block and the back end has the cores; when it is empty the back
    end blocks. Decoding threads stop at 8 (one image each in flight, up to 49 MB at full size).
    The back-end threads are 0: ONNX Runtime's and OpenVINO's own default, every (physical) core.
    """
    cores = max(1, cpus if cpus is not None else (os.cpu_count() or 1))
    return min(8, cores), 0


@dataclass(frozen=True)
class PredictOptions:
    """Options for :func:`scores_csv_from_images`.

    Attributes:
        batch_size: Images per inference call (default 16).
        device: ``cpu``, ``cuda`` or ``auto`` (default ``auto``).
        exif_transpose: Honour EXIF orientation (default ``False``, as the original code).
        workers: Decoding threads; 0 decodes in the calling thread (default
            :func:`split_cpus`, resolved when ``None``).
        resume: Keep an existing ``output`` and skip the images it already scores (default ``False``).
        overwrite: Replace an existing ``output`` (default ``False``: an existing non-empty
            output without ``resume`` is refused, so a re-run cannot wipe finished work).
        follow_symlinks: Follow symlinks that leave the folders given (default ``False``).
        check_integrity: Verify the artifact's recorded sha256 before scoring (default ``True``).
        backend: Back end to score with (default ``None``: chosen by the artifact's suffix,
            ``.onnx`` -> ONNX Runtime); see :func:`memexport.runtime.registry.runner_for`.
        precision: Compute precision for back ends that offer a choice (OpenVINO: ``fp32``,
            ``bf16``) (default ``None``: the back end's exact default).
        decode: ``exact`` (the original code's pixels) or ``fast`` (DCT-scaled JPEG decoding;
            see :mod:`memexport.runtime.preprocess`) (default ``exact``).
        threads: The back end's intra-op threads (default ``None``: :func:`split_cpus` decides,
            with the decoding threads).
        pipeline: How decoding shares the cores with inference: ``overlap`` (default: decoding runs
            ahead while the back end scores) or ``phases`` (a chunk decoded with every core, then
            scored with every core); see :mod:`memexport.runtime.decoding`.
    """

    batch_size: int = 16
    device: str = "auto"
    exif_transpose: bool = False
    workers: int | None = None
    resume: bool = False
    overwrite: bool = False
    follow_symlinks: bool = False
    check_integrity: bool = True
    backend: str | None = None
    precision: str | None = None
    decode: str = "exact"
    threads: int | None = None
    pipeline: str = "overlap"


@dataclass
class PredictSummary:
    """Outcome of a batch job.

    Attributes:
        scored: Images scored in this run (by at least one model).
        failures: Count of failed inputs by reason (``empty``, ``truncated``, ``symlink-outside``, ...).
        duplicates: Inputs naming a file already listed (each file is scored once).
        skipped: Images already scored in ``output`` and skipped by ``resume``.
        dropped_torn_row: Whether ``resume`` removed a torn last row left by a crash.
        total: Images this run set out to score (after duplicates and resume).
        errors_path: Where per-file errors were written, if any failed.
        elapsed_s: Wall time of the scoring loop.
        interrupted: Whether Ctrl-C or SIGTERM stopped the run early.
        backend: The back end that computed the (first model's) scores (``onnxruntime``, ``openvino``, ``tensorrt``).
        precision: The precision it computed them in (``fp32``, ``bf16``, ``int8``...; ``int8-unverified``
            when outside the precision the artifact's calibration verified).
        warnings: One-line warnings about the run (such as why it is unverified), for the caller to show.
        decode: How the images were decoded (``exact``, ``fast``).
        workers: Decoding threads used (0: inline; the Ray engine's actors decode their own).
        threads: The back end's threads (0: its own default).
        fast_label: What ``--fast`` resolved to, for the summary (one line per model; empty: not asked for).
        model: The model whose scores these are (the artifact's recorded name; the first model's, with several).
        runs: ``(backend, precision, decode)`` by model, for every model of the run, in order.
        pipeline: The decoding scheme (``overlap``, ``phases``).
    """

    scored: int = 0
    failures: Counter = field(default_factory=Counter)
    duplicates: list[Path] = field(default_factory=list)
    skipped: int = 0
    dropped_torn_row: bool = False
    total: int = 0
    errors_path: Path | None = None
    elapsed_s: float = 0.0
    interrupted: bool = False
    backend: str = ""
    precision: str = ""
    warnings: list[str] = field(default_factory=list)
    decode: str = "exact"
    workers: int = 0
    threads: int = 0
    fast_label: str = ""
    model: str = ""
    runs: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    pipeline: str = "overlap"

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def images_per_s(self) -> float:
        done = self.scored + self.failed
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0


def errors_path_for(output: Path) -> Path:
    """``scores.csv`` → ``scores.errors.csv``."""
    return output.with_name(f"{output.stem}.errors.csv")


def path_key(path: str | os.PathLike) -> str:
    """How ``resume`` matches a CSV row to an input: the real absolute path."""
    return os.path.realpath(path)


def absolute(path: str | os.PathLike) -> Path:
    """``path`` as every output names it: absolute, without resolving symlinks (the name the user gave)."""
    return Path(os.path.abspath(path))


# --------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class Held:
    """What an existing output already holds, whatever its format (a CSV, or Parquet parts).

    Attributes:
        scored: ``(path key, model)`` of every complete row (model ``""`` in rows that name none).
        model_runs: ``(model, (backend, precision, decode))`` of the rows that name their run.
        named: Whether its rows name their model (files written before the model column do not).
    """

    scored: frozenset[tuple[str, str]] = frozenset()
    model_runs: frozenset[tuple[str, tuple[str, ...]]] = frozenset()
    named: bool = True

    @property
    def models(self) -> frozenset[str]:
        """The models its rows name."""
        return frozenset(model for _, model in self.scored if model)

    def keys_of(self, model: str) -> frozenset[str]:
        """Path keys already scored by ``model`` (every row, in a file without the model column)."""
        return frozenset(key for key, named in self.scored if named in ("", model))

    def keys_of_all(self, models: Sequence[str] | None) -> frozenset[str]:
        """Path keys that every one of ``models`` already scored, which a run skips altogether
        (``None``: the models are not known yet, so any row counts)."""
        if models is None:
            return frozenset(key for key, _ in self.scored)
        keys = [self.keys_of(model) for model in models]
        return frozenset.intersection(*keys) if keys else frozenset()

    def runs_of(self, model: str) -> frozenset[tuple[str, ...]]:
        """The ``(backend, precision, decode)`` runs of ``model``'s rows (and of rows that name no model)."""
        return frozenset(run for named, run in self.model_runs if named in ("", model))


@dataclass(frozen=True)
class ScoresFile:
    """What an existing scores CSV holds.

    Attributes:
        keys: :func:`path_key` of every complete row.
        valid_bytes: Length of the prefix made of the header and complete rows.
        size: The file's length; larger than ``valid_bytes`` when the last row is torn.
        has_header: Whether the prefix includes a ``path,score`` header.
        columns: The header's columns (:data:`CSV_HEADER`, or one written before the model column:
            ``path,score``, ``path,score,backend,precision``, ``path,score,backend,precision,decode``).
        runs: The ``(backend, precision, decode)`` of the complete rows (empty for ``path,score``
            files; ``decode`` is ``exact`` for files written before it was a column).
        models: The models the rows name (empty for files written before the model column).
        scored: ``(path key, model)`` of every complete row (model ``""`` in files without the column).
        model_runs: ``(model, run)`` of the complete rows that name a run.
    """

    keys: frozenset[str]
    valid_bytes: int
    size: int
    has_header: bool
    columns: tuple[str, ...] = CSV_HEADER
    runs: frozenset[tuple[str, ...]] = frozenset()
    models: frozenset[str] = frozenset()
    scored: frozenset[tuple[str, str]] = frozenset()
    model_runs: frozenset[tuple[str, tuple[str, ...]]] = frozenset()

    @property
    def held(self) -> Held:
        """What the file holds, as every engine's resume reads it."""
        return Held(self.scored, self.model_runs, "model" in self.columns)

    def keys_of(self, model: str) -> frozenset[str]:
        """Path keys already scored by ``model`` (every row, in a file without the model column)."""
        return self.held.keys_of(model)


HEADERS = (SCORES_HEADER, SCORES_HEADER + OLD_RUN_COLUMNS, SCORES_HEADER + RUN_COLUMNS, CSV_HEADER)


def _row_facts(row: Sequence[str], columns: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]]:
    """``(score text, model or "", run)`` of a row laid out as ``columns`` (one of :data:`HEADERS`)."""
    named = dict(zip(columns, row))
    run = tuple(named.get(column, OLD_DECODE) for column in RUN_COLUMNS) if "backend" in named else ()
    return named["score"], named.get("model", ""), run


def _valid_score(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and 0.0 <= value <= 1.0


def read_scores_file(output: Path) -> ScoresFile:
    """Parse a scores CSV written by :func:`scores_csv_from_images`, tolerating a torn tail.

    A complete row has the header's columns (``path,score[,backend,precision]``), ends in ``\\n``
    and holds a score in [0, 1]. Anything
    else is accepted only as the very last row (a write cut by a crash) and left out of
    ``valid_bytes``; anywhere else it means the file is not ours.

    Raises:
        UsageError: The file is not a memexport scores CSV, or was edited mid-way.
    """
    raw = output.read_bytes()
    text = raw.decode("utf-8", "surrogateescape")
    position = 0

    def lines() -> Iterator[str]:
        nonlocal position
        while position < len(text):
            end = text.find("\n", position)
            end = len(text) if end < 0 else end + 1
            chunk = text[position:end]
            position = end
            yield chunk

    reader = csv.reader(lines(), strict=True)
    scored: set[tuple[str, str]] = set()
    runs: set[tuple[str, ...]] = set()
    model_runs: set[tuple[str, tuple[str, ...]]] = set()
    columns: tuple[str, ...] = CSV_HEADER
    valid_chars, has_header, row_number = 0, False, 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:
            row = None
        row_number += 1
        complete = row is not None and text[position - 1 : position] == "\n"
        if row_number == 1 and complete and tuple(row or ()) in HEADERS:
            has_header, valid_chars, columns = True, position, tuple(row or ())
            continue
        facts = _row_facts(row, columns) if complete and has_header and row is not None and len(row) == len(columns) else None
        if facts is not None and _valid_score(facts[0]):
            scored.add((path_key(row[0]), facts[1]))  # type: ignore[index]
            runs.update([facts[2]] if facts[2] else [])
            model_runs.update([(facts[1], facts[2])] if facts[2] else [])
            valid_chars = position
            continue
        if position >= len(text):
            break  # a torn last row: dropped
        raise UsageError(
            f"{output}: row {row_number} is not a `path,score` row, so this is not a memexport scores file "
            "(or it was edited); pass --overwrite to start again or choose another -o"
        )
    valid_bytes = len(text[:valid_chars].encode("utf-8", "surrogateescape"))
    keys = frozenset(key for key, _ in scored)
    models = frozenset(model for _, model in scored if model)
    return ScoresFile(keys, valid_bytes, len(raw), has_header, columns, frozenset(runs), models, frozenset(scored), frozenset(model_runs))


# --------------------------------------------------------------------------- writing


class _CsvAppender:
    """Appends rows in one write per batch, then flush and fsync."""

    def __init__(self, path: Path, header: Sequence[str], append: bool) -> None:
        self.path = path
        existed = path.exists()
        self.handle: TextIO = open(path, "a" if append else "w", **_ENCODING)  # type: ignore[call-overload]
        if not append or self.handle.tell() == 0:
            self.write([tuple(header)])
        if not existed:
            fsync_dir(path.parent)

    def write(self, rows: Iterable[Sequence[str]]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        text = buffer.getvalue()
        if text:
            self.handle.write(text)
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


_MISSING_DETAIL = {
    "missing": "file or folder not found; check the path",
    "unreadable": "cannot list this folder; check its permissions",
}


# --------------------------------------------------------------------------- the job


def _prepare_output(output: Path, options: PredictOptions, summary: PredictSummary) -> Held:
    """Check ``output`` against resume/overwrite; repair a torn tail; return what it already holds."""
    if output.is_dir():
        raise UsageError(f"{output}: is a folder; pass a .csv file name with -o")
    exists = output.exists() and output.stat().st_size > 0
    if not exists or options.overwrite:
        return Held()
    if not options.resume:
        raise UsageError(
            f"{output} already exists; pass --resume to continue it (already scored images are skipped) "
            "or --overwrite to start again"
        )
    state = read_scores_file(output)
    if state.valid_bytes < state.size:
        # The only bytes ever removed: a row cut short by a crash, rescored below.
        with open(output, "r+b") as handle:
            handle.truncate(state.valid_bytes)
            handle.flush()
            os.fsync(handle.fileno())
        summary.dropped_torn_row = True
    return state.held


def run_label(run: Sequence[str]) -> str:
    """``onnxruntime fp32, exact decode`` for a ``(backend, precision, decode)`` run."""
    return f"{' '.join(run[:2])}, {run[2]} decode" if len(run) > 2 else " ".join(run)


def check_same_run(output: Path, runs: Iterable[tuple[str, ...]], run: tuple[str, ...], model: str = "") -> None:
    """Refuse to resume an output whose scores another back end, precision or decode mode computed.

    Args:
        output: The scores output (named in the message).
        runs: The ``(backend, precision, decode)`` its rows already hold.
        run: What this run computes.
        model: The model whose rows these are, named in the message (default ``""``: a one-model run).

    Raises:
        UsageError: ``runs`` holds another run; one line naming both and the fix.
    """
    other = sorted(r for r in runs if tuple(r) != tuple(run))
    if other:
        seen = "; ".join(run_label(r) for r in other)
        whose, this = (f"{model} scores", f"{model} with {run_label(run)}") if model else ("scores", run_label(run))
        raise UsageError(
            f"{output} holds {whose} computed by {seen}; this run computes {this}, and one ranking must not mix them; "
            f"pass the same --backend, --precision and --decode to resume it, or --overwrite to start again"
        )


def check_same_models(output: Path, models: Iterable[str], scoring: Iterable[str]) -> None:
    """Refuse to resume an output that holds scores of a model this run does not score.

    Args:
        output: The scores output (named in the message).
        models: The models its rows name (none for files written before the model column).
        scoring: The models this run scores.

    Raises:
        UsageError: ``models`` holds another model; one line naming both and the fix.
    """
    other = sorted(set(models) - set(scoring))
    if other:
        raise UsageError(
            f"{output} holds scores of {', '.join(other)}; this run scores {', '.join(sorted(scoring))}, and one score column "
            f"must not mix two models' outputs; pass that model's artifact to resume it, another -o, or --overwrite to start again"
        )


def check_resumable(output: Path, held: Held, runs: Mapping[str, tuple[str, ...]], models: Sequence[str] | None = None) -> None:
    """Refuse to add this run's rows to ``output`` unless every row it holds is one of this run's
    models, computed by that model's back end, precision and decode mode (every engine's resume).

    Args:
        output: The scores output (named in the messages).
        held: What it holds (:class:`Held`).
        runs: ``(backend, precision, decode)`` by model, for the models this run scores (or, on Ray,
            those its actors have named so far).
        models: Every model this run scores (default ``None``: those of ``runs``).

    Raises:
        UsageError: One line naming what it holds, what this run computes and the fix.
    """
    models = list(runs) if models is None else list(models)
    check_same_models(output, held.models, models)
    if not held.named and held.scored and len(models) > 1:
        raise UsageError(
            f"{output} was written before the model column, so its scores name no model; a run of several models "
            f"({', '.join(models)}) must not add to it; resume it with its own model's artifact, or pass another -o"
        )
    for model, run in runs.items():
        check_same_run(output, held.runs_of(model), run, model if len(models) > 1 else "")


Row = tuple
"""A score row for a sink: ``(path, score, model[, (backend, precision, decode)])``."""


class CsvScores:
    """``scores.csv`` as a sink for :class:`ResultWriter`: ``path,model,score,backend,precision,decode``
    rows, scores to 8 decimals; into a file written before the model column, its own columns.

    Args:
        output: The CSV.
        append: Keep its rows (``resume``).
        runs: ``(backend, precision, decode)`` by model, written on each model's rows (default none).
        columns: The file's header (default :data:`CSV_HEADER`; an older file's when resumed).
    """

    def __init__(self, output: Path, append: bool, runs: Mapping[str, tuple[str, ...]] | None = None,
                 columns: tuple[str, ...] = CSV_HEADER) -> None:
        self.columns = tuple(columns)
        self.runs = dict(runs or {})
        self.appender = _CsvAppender(output, self.columns, append=append)

    def write(self, rows: Sequence[Row]) -> None:
        """Append ``(path, score, model[, run])`` rows: a row's own run, when given, is written on it
        (the Ray engine's rows carry what their actor computed), else its model's from ``runs``."""
        out = []
        for row in rows:
            model = row[2] if len(row) > 2 else ""
            run = row[3] if len(row) > 3 else self.runs.get(model, ())
            named = {"path": row[0], "score": f"{row[1]:.8f}", "model": model, **dict(zip(RUN_COLUMNS, run))}
            out.append(tuple(named.get(column, "") for column in self.columns))
        self.appender.write(out)

    def close(self) -> None:
        self.appender.close()


class ResultWriter:
    """Writes a job's results: scores to a sink and failures to ``<stem>.errors.csv``, each
    incrementally (one write, flush and fsync per call), counting both in ``summary``.

    The errors file is recomputed by every run (see the module docstring): an old one is removed
    now and a new one is created at the first failure.

    Args:
        output: The scores output (names the errors file).
        summary: Counts ``scored`` (images, whatever the models) and ``failures`` as rows are written.
        append: Keep the rows ``output`` already holds (``resume``).
        scores: Where scores go (default: a :class:`CsvScores` on ``output``).
    """

    def __init__(self, output: Path, summary: PredictSummary, append: bool, scores: CsvScores | None = None) -> None:
        self.summary = summary
        self.errors_file = errors_path_for(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        self.scores = scores if scores is not None else CsvScores(output, append)
        self.errors: _CsvAppender | None = None
        self.errors_file.unlink(missing_ok=True)

    def write(self, scored: Sequence[Row], failed: Sequence[tuple[str, str, str]] = ()) -> None:
        """Append ``(path, score, model[, run])`` rows and ``(path, reason, detail)`` failures (one per image)."""
        if scored:
            self.scores.write(scored)
        self.summary.scored += len({row[0] for row in scored})  # one row per image and model
        if failed:
            if self.errors is None:
                self.errors = _CsvAppender(self.errors_file, ERRORS_HEADER, append=False)
                self.summary.errors_path = self.errors_file
            self.errors.write([(path, f"{reason}: {detail}") for path, reason, detail in failed])
            self.summary.failures.update(reason for _, reason, _ in failed)

    def close(self) -> None:
        self.scores.close()
        if self.errors is not None:
            self.errors.close()


def name_runs(summary: PredictSummary, runs: Mapping[str, tuple[str, str, str]]) -> None:
    """Record ``runs`` (by model) in ``summary``: ``runs``, and the first model's in ``model``,
    ``backend``, ``precision`` and ``decode``."""
    summary.runs.update(runs)
    first = next(iter(summary.runs), "")
    if first:
        summary.model = first
        summary.backend, summary.precision, summary.decode = summary.runs[first]


def csv_writer_for_run(
    output: Path, options: PredictOptions, summary: PredictSummary, held: Held, runs: Mapping[str, tuple[str, str, str]],
    models: Sequence[str] | None = None,
) -> ResultWriter:
    """The :class:`ResultWriter` on ``output`` for the scores of ``runs``' models, once ``output`` is known
    to hold no other model's or run's scores (every engine's CSV goes through here).

    Args:
        output: The CSV, already checked by :func:`prepare_job`.
        options: ``resume`` keeps its rows.
        summary: Gets the runs (see :func:`name_runs`).
        held: What ``output`` already holds (from :func:`prepare_job`).
        runs: ``(backend, precision, decode)`` by model (the artifacts' recorded names), written on
            each model's new rows that do not carry their own.
        models: Every model the run scores (default ``None``: those of ``runs``).

    Raises:
        UsageError: See :func:`check_resumable`.
    """
    state = read_scores_file(output) if options.resume and output.is_file() and output.stat().st_size else None
    check_resumable(output, state.held if state else Held(), runs, models)
    name_runs(summary, runs)
    append = bool(held.scored) or options.resume
    # An older file keeps its own columns (path,score or path,score,backend,precision: exact decoding,
    # checked above); every new file names the model, back end, precision and decode mode.
    scores = CsvScores(output, append, runs, state.columns if state is not None else CSV_HEADER)
    return ResultWriter(output, summary, append=append, scores=scores)


def prepare_job(output: Path, options: PredictOptions, summary: PredictSummary,
                prepare: Callable[[Path, PredictOptions, PredictSummary], Held] = _prepare_output) -> Held:
    """Check the options and ``output`` (resume, overwrite) before anything is loaded.

    Args:
        prepare: Checks ``output`` against resume/overwrite and returns what it holds (default: the
            CSV's own check, which also repairs a torn last row).

    Raises:
        UsageError: Bad options, or ``output`` exists without ``resume``/``overwrite``.
    """
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {options.batch_size}")
    if options.resume and options.overwrite:
        raise UsageError("--resume keeps the existing output and --overwrite replaces it; pass one of them")
    check_pipeline(options.pipeline)
    return prepare(output, options, summary)


def pending_images(inputs: Sequence[Path], options: PredictOptions, summary: PredictSummary, held: Held,
                   models: Sequence[str] | None = None) -> tuple[Collected, list[Path]]:
    """Collect the inputs and leave out those every one of ``models`` already scored in ``held``.

    Returns:
        ``(collected inputs, images to score)``; ``summary`` gets the duplicates, the skipped count
        and the total.
    """
    collected = collect_images(inputs, follow_symlinks=options.follow_symlinks)
    summary.duplicates = list(collected.duplicates)
    done = held.keys_of_all(models)
    # Absolute from here on: rows must name the same files whatever the directory a resume runs from.
    todo = [absolute(p) for p in collected.paths if not done or path_key(p) not in done]
    summary.skipped = len(collected.paths) - len(todo)
    summary.total = len(todo)
    return collected, todo


def plan_job(
    inputs: Sequence[Path], output: Path, options: PredictOptions, summary: PredictSummary,
    prepare: Callable[[Path, PredictOptions, PredictSummary], Held] = _prepare_output, models: Sequence[str] | None = None,
) -> tuple[Held, Collected, list[Path]]:
    """:func:`prepare_job`, then :func:`pending_images`: ``(what output holds, collected inputs, images to score)``."""
    held = prepare_job(output, options, summary, prepare)
    return (held, *pending_images(inputs, options, summary, held, models))


def upfront_failures(collected: Collected) -> list[tuple[str, str, str]]:
    """``(path, reason, detail)`` for inputs refused before decoding (missing, symlinks outside, ...)."""
    failed = [(str(absolute(p)), reason, _MISSING_DETAIL.get(reason, "cannot be read")) for p, reason in collected.missing]
    return failed + [(str(absolute(p)), reason, detail) for p, reason, detail in collected.rejected]


def interrupted(summary: PredictSummary, output: Path, started: float) -> Interrupted:
    """The :class:`Interrupted` error for a run stopped by Ctrl-C or SIGTERM."""
    summary.interrupted = True
    summary.elapsed_s = time.perf_counter() - started
    return Interrupted(
        f"interrupted after scoring {summary.scored} of {summary.total} images; every finished score is in {output}; "
        "rerun the same command with --resume to continue",
        summary,
    )


ModelArg = Union[Path, str, Artifact, Sequence[Union[Path, str, Artifact]]]
"""One artifact, or several (one per model), each a path or an :class:`~memexport.runtime.multi.Artifact`."""


def artifacts_of(model: ModelArg, options: PredictOptions) -> list[Artifact]:
    """``model`` as a list of :class:`~memexport.runtime.multi.Artifact`, ``options``' back end and
    precision filling what each leaves open.

    Raises:
        UsageError: No artifact given.
    """
    models = [model] if isinstance(model, (str, os.PathLike, Artifact)) else list(model)
    if not models:
        raise UsageError("pass at least one artifact with -m")
    return [Artifact.of(one, options.backend, options.precision) for one in models]


def scores_csv_from_images(
    model: ModelArg, inputs: Sequence[Path], output: Path, options: PredictOptions = PredictOptions(),
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> PredictSummary:
    """Score files and folders into ``output`` (``path,model,score,backend,precision,decode``) and ``<stem>.errors.csv`` (``path,error``).

    With several artifacts (one per model) each image is decoded and resized once and scored by every
    model (:class:`~memexport.runtime.multi.MultiPredictor`): one row per image and model.

    Args:
        model: Artifact to score with (``.onnx``, ``.xml`` OpenVINO IR, or a ``.plan``/``.engine``
            TensorRT engine), or a list of them, one per model; each a path or an
            :class:`~memexport.runtime.multi.Artifact` naming its own back end and precision.
        inputs: Files and folders (folders recursively, sorted).
        output: CSV destination.
        options: See :class:`PredictOptions`.
        progress: Called with ``(done, total)`` after each batch (done counts images scored and failed).

    Returns:
        A :class:`PredictSummary`.

    Raises:
        UsageError: Bad options, two artifacts of one model, or ``output`` exists without ``resume``/``overwrite``
            (or holds what this run must not add to: :func:`check_resumable`).
        Interrupted: Ctrl-C (``KeyboardInterrupt``) stopped the run; every finished row is on
            disk and ``error.summary`` says how far it got.
        ArtifactError: A model cannot be loaded (missing, corrupt, tampered).
    """
    split_workers, split_threads = split_cpus()
    workers = split_workers if options.workers is None else options.workers
    threads = split_threads if options.threads is None else options.threads
    if workers < 0 or threads < 0:
        raise UsageError(f"--workers and --threads must be >= 0, got {workers} and {threads}")
    check_decode(options.decode)
    artifacts = artifacts_of(model, options)
    output = Path(output)
    summary = PredictSummary(workers=workers, threads=threads, pipeline=options.pipeline)
    held = prepare_job(output, options, summary)
    shared = RunnerOptions(device=options.device, check_integrity=options.check_integrity, threads=threads)
    with ExitStack() as stack:
        runners = [stack.enter_context(artifact.runner(shared)) for artifact in artifacts]
        multi = stack.enter_context(MultiPredictor(runners, options.batch_size, exif_transpose=options.exif_transpose, decode=options.decode))
        summary.warnings.extend(runner.unverified for runner in runners if runner.unverified)
        runs = {name: (runner.backend, runner.recorded_precision, options.decode) for name, runner in multi.runners.items()}
        writer = stack.enter_context(closing(csv_writer_for_run(output, options, summary, held, runs)))
        collected, todo = pending_images(inputs, options, summary, held, multi.names)
        summary.elapsed_s = _score_all(multi, todo, writer, options, workers, _lacking(held, todo, multi.names), collected, progress, summary, output)
    return summary


def _lacking(held: Held, todo: Sequence[Path], models: Sequence[str]) -> dict[str, frozenset[str]]:
    """For a resumed run, the models that still lack each image of ``todo`` (by ``str(path)``); empty
    when ``held`` is empty, as every model then scores every image."""
    if not held.scored:
        return {}
    done = {model: held.keys_of(model) for model in models}
    keys = {str(path): path_key(path) for path in todo}
    return {name: frozenset(m for m in models if key not in done[m]) for name, key in keys.items()}


def _score_all(multi: MultiPredictor, todo: Sequence[Path], writer: ResultWriter, options: PredictOptions, workers: int,
               lacking: Mapping[str, frozenset[str]], collected: Collected, progress: Callable[[int, int], None],
               summary: PredictSummary, output: Path) -> float:
    """Decode ``todo`` once, score each batch with every model that lacks it, write the rows; the wall time."""
    started = time.perf_counter()
    batches = decoded_batches(multi, todo, options.batch_size, workers, options.pipeline)
    wanted = (lambda path, model: model in lacking[str(path)]) if lacking else None
    try:
        writer.write([], upfront_failures(collected))
        done = 0
        for batch in batches:
            results = multi.score_batch(batch, wanted)
            writer.write(
                [(r.source, score, name) for r in results if r.error is None for name, score in r.scores.items()],
                [(r.source, r.error.reason, r.error.detail) for r in results if r.error is not None],
            )
            done += len(batch)
            progress(done, summary.total)
    except KeyboardInterrupt:
        raise interrupted(summary, output, started) from None
    finally:
        batches.close()  # stops the decoding pool now, not when garbage collected
    return time.perf_counter() - started
