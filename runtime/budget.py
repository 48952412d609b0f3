"""VRAM budget arithmetic (pure logic; the TensorRT issue extends it)."""

from __future__ import annotations

from pathlib import Path

from memexport.errors import BudgetError

GIB = 1024**3


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the ONNX file and its external data, a close stand-in for its weights."""
    total = path.stat().st_size
    for sibling in path.parent.glob(path.name + ".data"):
        total += sibling.stat().st_size
    return total


def check_onnx_fits(path: Path, max_batch: int, budget_bytes: int) -> None:
    """Refuse an ONNX model whose weights alone exceed the budget."""
    need = onnx_weight_bytes(path)
    if need > budget_bytes:
        raise BudgetError(f"{path}: weights need {need / GIB:.2f} GiB, over the {budget_bytes / GIB:.2f} GiB VRAM budget; use INT8 or a larger GPU")
