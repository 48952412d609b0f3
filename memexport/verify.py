"""``verify``: compare an artifact with its torch reference on real images, or its fast decoding with its exact decoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from memexport.core.errors import InputImageError, UsageError
from memexport.core.parity import ParityReport, compare
from memexport.core.spec import PreprocessSpec
from memexport.runtime.preprocess import check_decode, preprocess
from memexport.runtime.base import Runner, RunnerOptions
from memexport.runtime.registry import runner_for
from memexport.core.spec import Tolerance, get_spec


@dataclass(frozen=True)
class VerifyOptions:
    """Options for :func:`verify_artifact`.

    Attributes:
        weights: Reference checkpoint (default ``None``: the one recorded in the artifact,
            else the installed published weights).
        device: ``cpu`` or ``cuda`` for both sides (default ``cpu``).
        batch_size: Images per inference call (default 8).
        tolerance: Override the spec's tolerance for the precision computed (default ``None``).
        backend: Back end that runs the artifact (default ``None``: by its suffix).
        precision: Compute precision where the back end offers a choice (OpenVINO ``fp32``/``bf16``)
            (default ``None``: exact). The spec's tolerance for the precision actually computed applies.
        decode: ``exact`` (default: the artifact against torch) or ``fast``: the artifact's scores with
            fast decoding against its own with exact decoding, under the spec's ``decode_tolerance``
            (no torch needed).
    """

    weights: Path | None = None
    device: str = "cpu"
    batch_size: int = 8
    tolerance: Tolerance | None = None
    backend: str | None = None
    precision: str | None = None
    decode: str = "exact"


@dataclass(frozen=True)
class VerifyResult:
    """A parity report plus the per-image scores and the inputs that failed to load."""

    report: ParityReport
    names: tuple[str, ...]
    candidate: np.ndarray
    reference: np.ndarray
    bad_inputs: tuple[InputImageError, ...]
    backend: str
    precision: str
    decode: str = "exact"

    @property
    def compared(self) -> str:
        """What was compared, for the report's first line."""
        if self.decode == "fast":
            return f"{self.backend} {self.precision}, fast decode vs exact decode"
        return f"{self.backend} {self.precision} vs torch fp32"


def _preprocessed(images: Sequence[Path], spec: PreprocessSpec, decodes: Sequence[str]) -> tuple[list[np.ndarray], list[str], list[InputImageError]]:
    """The readable ``images`` as one batch per decode mode in ``decodes``, their names, and the
    errors of the others (an image is kept only when every mode reads it)."""
    arrays: list[list[np.ndarray]] = [[] for _ in decodes]
    names, bad = [], []
    for path in images:
        try:
            inputs = [preprocess(path, spec, decode=decode) for decode in decodes]
        except InputImageError as error:
            bad.append(error)
            continue
        for batch, array in zip(arrays, inputs):
            batch.append(array)
        names.append(str(path))
    if not names:
        raise UsageError(f"no readable images among {len(images)} inputs; pass a folder of JPEG/PNG images with --images")
    return [np.stack(batch) for batch in arrays], names, bad


def _scores(runner: Runner, batch: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([runner.infer(batch[i : i + size]) for i in range(0, len(batch), size)])


def verify_artifact(artifact: Path | str, images: Sequence[Path], options: VerifyOptions = VerifyOptions()) -> VerifyResult:
    """Score ``images`` with the artifact and with the torch reference, and compare; with
    ``options.decode == "fast"``, the artifact's fast-decoded scores with its exact-decoded ones.

    Raises:
        UsageError: No readable image. ParityError is not raised here: call
            :func:`memexport.core.parity.require` on the report.
    """
    check_decode(options.decode)
    with runner_for(artifact, RunnerOptions(device=options.device), options.backend, precision=options.precision) as runner:
        meta = runner.metadata
        assert meta is not None
        # The same images and runner both ways: only the decoding differs.
        batches, names, bad = _preprocessed(images, meta.preprocess, ("exact", options.decode) if options.decode == "fast" else ("exact",))
        batch = batches[0]
        exact = _scores(runner, batch, options.batch_size)
        backend, precision = runner.backend, runner.precision
        if options.decode == "fast":
            candidate = _scores(runner, batches[1], options.batch_size)
            tolerance = options.tolerance or get_spec(meta.model).decode_tolerance
            report = compare(candidate, exact, tolerance)
            return VerifyResult(report, tuple(names), candidate, exact, tuple(bad), backend, precision, "fast")
    from memexport.export.torch_runner import reference_runner_for

    candidate = exact
    with reference_runner_for(meta, options.weights, options.device) as reference_runner:
        reference = _scores(reference_runner, batch, options.batch_size)
    tolerance = options.tolerance or get_spec(meta.model).tolerance(precision)
    return VerifyResult(compare(candidate, reference, tolerance), tuple(names), candidate, reference, tuple(bad), backend, precision)


def unverified_warning(path: Path | str) -> str | None:
    """One line when ``path`` is an INT8 artifact whose fidelity calibration could not verify, or when its
    metadata cannot be parsed (so nothing shows it verified), else ``None``.

    Reads only the artifact's memexport metadata entry (no model load; for an OpenVINO IR ``.xml``,
    its ``rt_info``, without openvino). Calibration writes such
    an artifact when its evidence was too thin to show the target (``fidelity.verified`` false).
    """
    import json
    import mmap

    from memexport.core.errors import MemexportError
    from memexport.runtime.integrity import MissingMetadataEntry, find_metadata_entry

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".xml") or not path.is_file() or path.stat().st_size == 0:
        return None  # the runner refuses a missing or empty file in its own line
    try:
        if suffix == ".xml":
            value = _ir_metadata(path)
        else:
            with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                value = find_metadata_entry(data, path).value
        fidelity = json.loads(value).get("extra", {}).get("fidelity") if value else None
    except MissingMetadataEntry:
        return None  # not a memexport artifact at all: the runner refuses it in its own line
    except (OSError, ValueError, MemexportError, AttributeError, SyntaxError) as exc:
        # Unreadable metadata cannot show the artifact verified: say so rather than stay silent.
        why = " ".join(str(exc).split())[:160] or type(exc).__name__
        return f"warning: {path.name}: cannot read its memexport metadata ({why}), so whether its fidelity was verified is unknown; re-export or recalibrate it"
    if not isinstance(fidelity, dict) or fidelity.get("verified") is not False:
        return None
    target = fidelity.get("target", {})
    return (
        f"warning: {path.name}: INT8 fidelity not verified at calibration: spearman {fidelity.get('spearman')} "
        f"(90% interval {fidelity.get('spearman_low')}-{fidelity.get('spearman_high')}), mean abs <= {fidelity.get('mean_abs_high')} "
        f"on {fidelity.get('images')} images, target spearman >= {target.get('min_spearman')}, mean abs <= {target.get('max_mean_abs')}; "
        "recalibrate on more images to verify it"
    )



def _ir_metadata(path: Path) -> str | None:
    """The memexport metadata JSON in an OpenVINO IR's top-level ``rt_info``, or ``None``."""
    import xml.etree.ElementTree as ElementTree

    from memexport.runtime.metadata import METADATA_KEY

    entry = ElementTree.parse(path).getroot().find(f"rt_info/{METADATA_KEY}")
    return entry.get("value") if entry is not None else None
