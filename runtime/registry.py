"""One registry of runners: back-end names and artifact suffixes to runner classes.

Entries name a module and a class, so importing the registry imports no back end: the
runner's module loads when :func:`runner_for` picks it. A new back end is one module with a
:class:`~memexport.runtime.base.Runner` subclass plus one entry here (or one
:func:`add_backend` call from its own package).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memexport.core.errors import UsageError
from memexport.runtime.base import Runner, RunnerOptions


@dataclass(frozen=True)
class Entry:
    """Where a back end's runner lives and which artifacts it reads.

    Attributes:
        suffixes: Artifact suffixes it accepts (lower case, with the dot).
        module: Module holding the runner class.
        cls: The runner class's name.
        default_for: Suffixes it is chosen for when no back end is named (default: all of ``suffixes``).
    """

    suffixes: tuple[str, ...] | str
    module: str
    cls: str
    default_for: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        # One suffix may be given as a plain string: Entry(".onnx", ...).
        for name in ("suffixes", "default_for"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
        object.__setattr__(self, "suffixes", tuple(s.lower() for s in self.suffixes))

    def load(self) -> type[Runner]:
        return getattr(importlib.import_module(self.module), self.cls)


BACKENDS: dict[str, Entry] = {
    "onnxruntime": Entry(".onnx", "memexport.runtime.onnxruntime_runner", "OnnxRuntimeRunner"),
    "tensorrt": Entry((".plan", ".engine", ".trt"), "memexport.runtime.tensorrt_runner", "TensorRTRunner"),
    "openvino": Entry((".onnx", ".xml"), "memexport.runtime.openvino_runner", "OpenVinoRunner", default_for=(".xml",)),
}


def add_backend(name: str, entry: Entry) -> None:
    """Register a back end (one call per back end; re-registering the same entry is a no-op)."""
    if name in BACKENDS and BACKENDS[name] != entry:
        raise UsageError(f"back end {name!r} is already registered as {BACKENDS[name].module}.{BACKENDS[name].cls}")
    BACKENDS[name] = entry


def backend_names() -> tuple[str, ...]:
    """The registered back ends, in registration order."""
    return tuple(BACKENDS)


def artifact_suffixes() -> tuple[str, ...]:
    """Every suffix some back end reads."""
    return tuple(dict.fromkeys(s for entry in BACKENDS.values() for s in entry.suffixes))


def backend_for(path: Path | str, backend: str | None = None) -> str:
    """The back end that runs ``path``: ``backend`` when it accepts the suffix, else the default for the suffix.

    Raises:
        UsageError: An unknown back end, a back end that cannot read this file, or an unknown suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if backend is not None:
        entry = BACKENDS.get(backend)
        if entry is None:
            raise UsageError(f"{path}: unknown back end {backend!r}; choose one of {', '.join(BACKENDS)}")
        if suffix not in entry.suffixes:
            raise UsageError(f"{path}: the {backend} back end reads {', '.join(entry.suffixes)} files, not {suffix or '(no suffix)'!r}; "
                             f"choose one of {', '.join(n for n, e in BACKENDS.items() if suffix in e.suffixes) or 'none'} for it")
        return backend
    for name, entry in BACKENDS.items():
        if suffix in (entry.default_for if entry.default_for is not None else entry.suffixes):
            return name
    raise UsageError(f"{path}: unknown artifact type {suffix or '(no suffix)'!r}; expected .onnx, .xml (OpenVINO IR), .plan or .engine")


def runner_for(path: Path | str, options: RunnerOptions = RunnerOptions(), backend: str | None = None,
               backend_options: Any = None, precision: str | None = None) -> Runner:
    """The runner for an artifact (inactive: use it as a context manager).

    Args:
        path: Artifact path.
        options: Shared runner options (default :class:`RunnerOptions`).
        backend: Back-end name (default ``None``: chosen by suffix, ``.onnx`` -> ``onnxruntime``,
            ``.xml`` (OpenVINO IR) -> ``openvino``, ``.plan``/``.engine``/``.trt`` -> ``tensorrt``).
        backend_options: The back end's own options (default ``None``: its defaults).
        precision: Compute precision (``--precision``), turned into the back end's own options by
            :meth:`Runner.options_for_precision` (default ``None``: the back end's exact default).

    Raises:
        UsageError: See :func:`backend_for`.
    """
    name = backend_for(path, backend)
    cls = BACKENDS[name].load()
    if precision is not None:
        if backend_options is not None:
            raise UsageError(f"{path}: pass a precision or the back end's own options, not both")
        try:
            backend_options = cls.options_for_precision(precision)
        except UsageError as error:
            raise UsageError(f"{path}: {error}") from None
    return cls(path, options, backend_options)
