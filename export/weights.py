"""Finding and loading checkpoints, safely.

The published ResMem weights ship inside the ``resmem`` distribution (non-commercial
licence): memexport locates them through package metadata, never imports ``resmem``
(its ``__init__`` needs torchvision), never copies them and never downloads anything.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Mapping

from memexport.core.errors import CheckpointError
from memexport.runtime.integrity import sha256_file  # re-exported: the one file hasher

RESMEM_DISTRIBUTION = "resmem"
RESMEM_WEIGHTS_IN_DIST = "resmem/model.pt"
INSTALL_HINT = "install the published weights with `pip install --no-deps resmem==1.1.6`, or pass --weights PATH"


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
        return sha256_file(self.path) if self.path is not None else None

    def describe(self) -> dict[str, object]:
        """JSON-friendly record for artifact metadata."""
        return {
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "parts": {name: {"path": str(p), "sha256": sha256_file(p)} for name, p in self.parts.items()},
            "seed": self.seed,
        }


def installed_resmem_weights() -> Path:
    """Path of ``resmem/model.pt`` inside the installed ``resmem`` distribution.

    Raises:
        CheckpointError: When the distribution or its weights file is missing.
    """
    try:
        dist = metadata.distribution(RESMEM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"published ResMem weights not found: the `resmem` package is not installed; {INSTALL_HINT}") from None
    path = Path(str(dist.locate_file(RESMEM_WEIGHTS_IN_DIST)))
    if not path.is_file():
        raise CheckpointError(f"published ResMem weights not found at {path}; {INSTALL_HINT}")
    return path


def resolve(weights: Path | str | None, parts: Mapping[str, Path] | None = None, seed: int = 0) -> WeightsSource:
    """Turn a ``--weights`` option into a :class:`WeightsSource`.

    Args:
        weights: A checkpoint path, or ``None`` for the installed published ResMem weights.
        parts: Extra named checkpoints (default none).
        seed: Seed for randomly initialised parts (default 0).
    """
    path = installed_resmem_weights() if weights is None else Path(weights)
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
