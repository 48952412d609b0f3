"""The names under which ``memexport serve`` and ``memexport triton-repo`` serve their artifacts.

One rule for both, so one client works against either:

1. ``-m NAME=PATH`` serves the artifact at ``PATH`` as ``NAME``.
2. Otherwise the artifact is served under its model's name (``resmem``, from its metadata). When
   several unnamed artifacts share a model, each one whose precision is not FP32 gets its precision
   appended: ``-m resmem.onnx -m resmem.int8-openvino.xml`` serves ``resmem`` and ``resmem_int8``.
3. Names that are still equal (two FP32 artifacts of one model, or a name given twice) are
   refused with one line naming both arguments; name one of them with ``NAME=PATH``.

A name is what Triton accepts as a model folder and the V2 protocol as a path segment: letters,
digits, ``_``, ``.`` and ``-``, starting with a letter or digit, at most 64 characters.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from memexport.core.errors import ArtifactError, UsageError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EXACT = "fp32"


@dataclass(frozen=True)
class ModelArg:
    """One ``-m`` argument: the artifact, and the name it was given (``None``: by the rule).

    Attributes:
        path: The artifact.
        name: The name given with ``NAME=PATH``, else ``None``.
    """

    path: Path
    name: Optional[str] = None

    @property
    def text(self) -> str:
        """The argument as the user wrote it (for messages)."""
        return f"{self.name}={self.path}" if self.name else str(self.path)

    @classmethod
    def parse(cls, text: str) -> "ModelArg":
        """``PATH`` or ``NAME=PATH``; an existing file whose name holds ``=`` is a path.

        Raises:
            UsageError: ``NAME=PATH`` with a name the protocol cannot carry.
        """
        if "=" not in text or Path(text).exists():
            return cls(Path(text))
        name, _, path = text.partition("=")
        if not NAME.match(name):
            raise UsageError(f"-m {text}: {name!r} is not a model name (letters, digits, _ . -, starting with a letter or "
                             "digit, at most 64 characters); write -m NAME=PATH")
        return cls(Path(path), name)


def derived_name(model: str, precision: str, shared: bool) -> str:
    """The rule's name for an unnamed artifact of ``model`` in ``precision``; ``shared``: another unnamed
    artifact has the same model."""
    if not shared or precision.lower() == EXACT:
        return model
    return f"{model}_{re.sub(r'[^a-z0-9]', '', precision.lower()) or 'other'}"


def served_names(args: Sequence[ModelArg], models: Sequence[tuple[str, str]]) -> list[str]:
    """The name of each artifact, in order.

    Args:
        args: The ``-m`` arguments.
        models: ``(model, precision)`` of each artifact, read from its metadata.

    Raises:
        UsageError: Two artifacts that would get one name, or a model name the protocol cannot carry.
    """
    unnamed = [model for arg, (model, _) in zip(args, models) if arg.name is None]
    names = [arg.name or derived_name(model, precision, unnamed.count(model) > 1) for arg, (model, precision) in zip(args, models)]
    seen: dict[str, ModelArg] = {}
    for arg, name in zip(args, names):
        if not NAME.match(name):
            raise UsageError(f"-m {arg.text}: its model name {name!r} cannot be served as is; name it with -m NAME={arg.path}")
        if name in seen:
            raise UsageError(f"-m {seen[name].text} and -m {arg.text} would both be served as {name!r}; "
                             f"name one of them with -m NAME=PATH, e.g. -m {name}_b={arg.path}")
        seen[name] = arg
    return names


def artifact_identity(path: Path) -> tuple[str, str]:
    """``(model, precision)`` from an artifact's memexport metadata, read without loading it.

    Raises:
        ArtifactError: A missing file, or one without memexport metadata.
    """
    from memexport.runtime.metadata import ArtifactMetadata

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".plan", ".engine"):
        from memexport.runtime.engine_sidecar import read_sidecar

        meta = read_sidecar(path).metadata
        return meta.model, meta.precision
    if suffix == ".xml":
        from memexport.runtime.ir_integrity import ir_metadata_value
        from memexport.runtime.metadata import METADATA_KEY, metadata_from_map

        value = ir_metadata_value(path)
        meta = metadata_from_map({METADATA_KEY: value} if value is not None else {}, path)
        return meta.model, meta.precision
    from memexport.runtime.integrity import check_model_present, find_metadata_entry

    check_model_present(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            value = find_metadata_entry(data, path).value  # the integrity check comes when the server loads it
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the artifact ({exc.strerror or exc}); check the path and permissions") from None
    meta = ArtifactMetadata.from_json(value, str(path))
    return meta.model, meta.precision


def name_artifacts(args: Sequence[ModelArg]) -> list[tuple[str, Path]]:
    """``(name, path)`` of each ``-m`` argument, by the rule, each artifact's metadata read once (nothing loaded).

    Raises:
        UsageError: No artifact, or two that would get one name.
        ArtifactError: An artifact that is missing or has no memexport metadata.
    """
    if not args:
        raise UsageError("pass at least one artifact with -m")
    return list(zip(served_names(args, [artifact_identity(arg.path) for arg in args]), [arg.path for arg in args]))
