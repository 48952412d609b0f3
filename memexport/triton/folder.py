"""The repository folder ``triton-repo`` writes: a new one built beside it, then swapped in.

Nothing is deleted that memexport did not write. Every repository holds :data:`MARKER`, which lists
the top-level entries memexport wrote there; ``--overwrite`` replaces a folder only when it holds the
marker and nothing else but those entries, and refuses any other non-empty folder (``-o ~`` included)
with one line, deleting nothing. The new repository is written in full into a temporary folder beside
the target first, so an artifact that lives inside the old repository is still there to be linked or
copied; then the old one is renamed aside, the new one renamed into place, and only then is the old
one removed. A failure before the swap leaves the old repository as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from memexport.core.atomic import fsync_dir
from memexport.core.errors import UsageError
from memexport.core.version import __version__

MARKER = ".memexport-triton-repo.json"
FORMAT = "memexport-triton-repo"


def marker_entries(repo: Path) -> list[str] | None:
    """The entries memexport wrote into ``repo``, from its marker (``None``: no readable marker)."""
    try:
        record = json.loads((repo / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entries = record.get("entries") if isinstance(record, dict) and record.get("format") == FORMAT else None
    return [str(e) for e in entries] if isinstance(entries, list) else None


def write_marker(repo: Path, models: Sequence[str]) -> None:
    """Record what memexport wrote (every top-level entry of the freshly written ``repo``)."""
    entries = sorted([p.name for p in repo.iterdir()] + [MARKER])
    record = {"format": FORMAT, "memexport": __version__, "models": list(models), "entries": entries}
    (repo / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def check_replaceable(repo: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder unless ``overwrite`` and memexport wrote all of it.

    Raises:
        UsageError: One line naming the folder, why it is kept, and what to do.
    """
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"{repo}: exists and is not a folder; choose another -o")
    if not repo.exists() or not any(repo.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{repo}: folder exists and is not empty; choose a new -o or pass --overwrite")
    entries = marker_entries(repo)
    if entries is None:
        raise UsageError(f"{repo}: not a repository written by memexport triton-repo (no {MARKER}); --overwrite only "
                         "replaces those, so nothing was deleted: choose a new -o or empty the folder yourself")
    foreign = sorted(p.name for p in repo.iterdir() if p.name not in entries)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UsageError(f"{repo}: holds {shown}, which memexport did not write; nothing was deleted: move them out "
                         "or choose a new -o")


@contextlib.contextmanager
def _beside(repo: Path, tag: str) -> Iterator[Path]:
    """A new, uniquely named folder beside ``repo`` (same file system: renames are atomic), removed unless renamed away."""
    repo.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{repo.name}.memexport-{tag}-", dir=repo.parent))
    try:
        yield path
    finally:
        if path.exists():
            shutil.rmtree(path)


def replace_repo(repo: Path, overwrite: bool, write: Callable[[Path], Sequence[str]]) -> list[str]:
    """Write a repository with ``write(folder)`` (which returns the model names) beside ``repo``, then swap it in.

    Raises:
        UsageError: ``repo`` cannot be replaced (see :func:`check_replaceable`), checked before anything is written.
    """
    repo = Path(repo)
    check_replaceable(repo, overwrite)
    with _beside(repo, "new") as new:
        names = list(write(new))
        write_marker(new, names)
        if repo.exists() and any(repo.iterdir()):
            check_replaceable(repo, overwrite)  # it could have changed while the new one was written
            with _beside(repo, "old") as old:
                old.rmdir()
                repo.rename(old)
                try:
                    new.rename(repo)
                except OSError:
                    old.rename(repo)  # put the old one back: nothing lost
                    raise
        else:
            if repo.exists():
                repo.rmdir()  # empty
            new.rename(repo)
        fsync_dir(repo.parent)
    return names
