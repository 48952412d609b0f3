"""The one layer map: which folder is which floor, bottom to top.

Imports go one way, from a floor to the floors below it (``tests/test_layers.py`` checks every
import against this map, and the README's *Layout* section is drawn from it). ``export`` and
``calibration`` share a floor; calibration may import export, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Floor:
    """One floor of the layer map.

    Attributes:
        rank: Height; a module may import only from floors of equal or lower rank.
        name: Short name, as the layer test reports it.
        folder: The source folder (or ``memexport/`` files) that make up the floor.
        packages: Python package prefixes that belong to this floor.
        modules: Single modules that belong to it (for the top folder's split into pipelines and CLI).
        role: One line for the README's drawing.
    """

    rank: int
    name: str
    folder: str
    packages: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    role: str = ""


FLOORS: tuple[Floor, ...] = (
    Floor(0, "core", "core/", packages=("memexport.core",),
          role="errors, model spec, atomic writes, optional imports, cache dir, rank statistics, parity"),
    Floor(1, "runtime", "runtime/", packages=("memexport.runtime",),
          role="torch-free: preprocessing, runners, Predictor, batch scoring, integrity, GPU facts"),
    Floor(2, "export", "export/", packages=("memexport.export",),
          role="PyTorch -> ONNX, FP16, TensorRT engines (torch, onnx)"),
    Floor(2, "calibration", "calibration/", packages=("memexport.calibration",),
          role="INT8 calibration and the rank-fidelity guard"),
    Floor(3, "pipeline", "memexport/ + distributed/", packages=("memexport.distributed", "memexport.serve", "memexport.serve.grpc", "memexport.triton"),
          role="command pipelines (bench, verify, inspect, doctor, serve, triton-repo) and Ray"),
    Floor(4, "cli", "memexport/cli.py", modules=("memexport.cli", "memexport.__main__"),
          role="the typer CLI: thin wrappers over library calls"),
)

# The package itself: its ``__init__`` is the public facade and every import runs it first.
FACADE = "memexport"


def floor_of(module: str) -> Floor:
    """The floor a ``memexport.*`` module lives on; other top-folder modules are pipelines."""
    for floor in FLOORS:
        if module in floor.modules or any(module == p or module.startswith(p + ".") for p in floor.packages):
            return floor
    return next(floor for floor in FLOORS if floor.name == "pipeline")


def drawing() -> str:
    """The floors as the README draws them, top floor first."""
    width = max(len(floor.folder) for floor in FLOORS)
    lines = []
    for rank in sorted({floor.rank for floor in FLOORS}, reverse=True):
        same = [floor for floor in FLOORS if floor.rank == rank]
        for floor in same:
            lines.append(f"{rank}  {floor.folder:<{width}}  {floor.role}")
    return "\n".join(lines)
