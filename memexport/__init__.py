"""memexport: export, verify and run image-memorability models (ResMem, M3M).

Importing this package never imports torch, onnx, TensorRT or CUDA; heavy back ends
load lazily where they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memexport.core.errors import MemexportError
from memexport.core.version import __version__

__all__ = ["MemexportError", "MultiPredictor", "Predictor", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from memexport.runtime.multi import MultiPredictor
    from memexport.runtime.predictor import Predictor


def __getattr__(name: str) -> Any:
    # Keep `import memexport` free of onnxruntime too: apps pay for it on first use.
    if name == "Predictor":
        from memexport.runtime.predictor import Predictor

        return Predictor
    if name == "MultiPredictor":
        from memexport.runtime.multi import MultiPredictor

        return MultiPredictor
    raise AttributeError(f"module 'memexport' has no attribute {name!r}")
