"""The one helper for optional dependencies (torch, onnx, TensorRT, OpenVINO, Ray, cuda-python...).

``import memexport`` and ``memexport --help`` work without any of them: each is imported
where it is first needed, through :func:`require` (a missing module is an error with one
consistent line and exit code 2) or :func:`optional` (a missing module is a fallback).
"""

from __future__ import annotations

import importlib
import types
from typing import Callable, Union

from memexport.core.errors import BackendUnavailableError


def _missing(exc: ImportError, module: str) -> bool:
    """True when ``exc`` says ``module`` itself (or a parent package) is absent, not a broken install."""
    name = getattr(exc, "name", None)
    return name is None or module == name or module.startswith(name + ".")


def require(module: str, extra: str, purpose: str = "", hint: Union[str, Callable[[], str], None] = None) -> types.ModuleType:
    """Import ``module``, or raise one line saying what needs it and how to install it.

    Args:
        module: Dotted module name, e.g. ``"tensorrt"`` or ``"onnxruntime.quantization"``.
        extra: The memexport extra that installs it (``export``, ``tensorrt``, ``gpu``...).
        purpose: What needs it, e.g. ``"building an engine"`` (default ``""``: "memexport").
        hint: How to install it, where a plain extra is not the whole answer (for example
            TensorRT 8.6 for Pascal GPUs), or a function computing it only when needed; default
            ``None``: ``pip install 'memexport[<extra>]'``.

    Returns:
        The imported module.

    Raises:
        BackendUnavailableError: (exit code 2) "<purpose> needs <module>, which is not installed;
            install it with pip install 'memexport[<extra>]'". A module that is present but fails
            to import is named as broken, with the import error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        how = (hint() if callable(hint) else hint) or f"install it with pip install 'memexport[{extra}]'"
        state = "which is not installed" if _missing(exc, module) else f"which fails to import ({exc})"
        raise BackendUnavailableError(f"{purpose or 'memexport'} needs {module}, {state}; {how}") from None


def optional(module: str) -> types.ModuleType | None:
    """Import ``module``, or ``None`` when it is not installed (for fallbacks, never for errors)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
