"""Crash-safe file output: write a temporary file beside the target, fsync, then rename.

A crash, kill or full disk during export, calibration or build therefore never leaves a
half-written artifact under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from memexport.errors import MemexportError


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(final: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync it and rename it over ``final``.

    Args:
        final: The artifact's final path.
        suffix: Suffix for the temporary name (default none); some writers infer formats from it.

    Raises:
        MemexportError: When the disk fills or the folder is not writable; the temporary file
            is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MemexportError(
            f"{final}: could not write ({exc.strerror or exc}); free disk space or choose another output folder"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: Path | str, text: str) -> None:
    """Write ``text`` to ``final`` through :func:`atomic_path`."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(final: Path | str, data: bytes) -> None:
    """Write ``data`` to ``final`` through :func:`atomic_path`."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
