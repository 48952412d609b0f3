"""Crash-safe file output: write a temporary file beside the target, fsync, then rename.

A crash, kill or full disk during export, calibration or build therefore never leaves a
half-written artifact under the final name: the final name either does not exist or holds
the previous complete file. A SIGKILL can leave a ``.<name>.*.tmp`` file beside it, never
the artifact itself; :func:`stale_temporaries` lists such leftovers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from memexport.core.errors import MemexportError


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


def _read_umask() -> int:
    # os.umask can only be read by setting it, which races with other threads; Linux exposes it.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# mkstemp creates 0600 files; artifacts get the permissions a plain open() would give them.
_DEFAULT_MODE = 0o666 & ~_read_umask()


def temporary_name_prefix(final: Path) -> str:
    """Prefix of the temporary files :func:`atomic_path` creates beside ``final``."""
    return f".{final.name}."


def stale_temporaries(final: Path | str) -> list[Path]:
    """Temporary files left beside ``final`` by a writer that was killed (SIGKILL, power cut)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    prefix = temporary_name_prefix(final)
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix) and ".tmp" in p.name[len(prefix):])


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
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=temporary_name_prefix(final), suffix=f".tmp{suffix}", dir=final.parent)
    except OSError as exc:
        raise MemexportError(f"{final}: cannot create a file in {final.parent} ({exc.strerror or exc}); choose a writable output folder") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.exists():
            raise MemexportError(f"{final}: the writer produced no file; nothing was written")
        fsync_file(tmp)
        os.chmod(tmp, _DEFAULT_MODE)
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
