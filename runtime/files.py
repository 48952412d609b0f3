"""Collecting image files from paths and folders, without leaving the folders given.

Folders are walked recursively in sorted order. A symlink whose target lies outside the
folder being walked is not followed (unless ``follow_symlinks``) and is reported instead,
so scoring a folder never reads files the folder's owner did not put there. File names
that are not valid UTF-8 are kept as Python keeps them (``surrogateescape``), so they can
be opened and written back byte for byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"})


@dataclass
class Collected:
    """Files to score, plus inputs that could not or must not be read.

    Attributes:
        paths: Image paths in order: arguments in the order given, folders walked recursively and sorted.
        missing: ``(path, reason)`` for arguments that do not exist or folders that cannot be listed.
        duplicates: Paths naming a file already listed (each file is scored once, under its first name).
        rejected: ``(path, reason, detail)`` for entries refused on purpose, such as symlinks
            that leave their folder (reason ``symlink-outside``).
    """

    paths: list[Path] = field(default_factory=list)
    missing: list[tuple[Path, str]] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    rejected: list[tuple[Path, str, str]] = field(default_factory=list)


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _walk(folder: Path, follow_symlinks: bool, out: Collected) -> Iterator[Path]:
    root = os.path.realpath(folder)
    visited: set[str] = set()

    def unreadable(error: OSError) -> None:
        out.missing.append((Path(error.filename or folder), "unreadable"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=follow_symlinks):
        real_dir = os.path.realpath(dirpath)
        if real_dir in visited:  # a symlink loop, or two links to one folder: walk it once
            dirnames[:] = []
            continue
        visited.add(real_dir)
        kept = []
        for name in sorted(dirnames):
            sub = os.path.join(dirpath, name)
            if os.path.islink(sub) and not follow_symlinks and not _inside(os.path.realpath(sub), root):
                out.rejected.append((Path(sub), "symlink-outside", _outside_detail(sub)))
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not follow_symlinks and path.is_symlink() and not _inside(os.path.realpath(path), root):
                out.rejected.append((path, "symlink-outside", _outside_detail(str(path))))
                continue
            yield path


def _outside_detail(path: str) -> str:
    return (
        f"symlink to {os.path.realpath(path)}, outside the folder being scored; not followed "
        "(pass --follow-symlinks to score it)"
    )


def collect_images(inputs: Iterable[Path | str], follow_symlinks: bool = False) -> Collected:
    """Expand files and folders into image paths.

    Args:
        inputs: Files and folders. Files are kept whatever their suffix (the loader reports
            non-images); folders contribute files with an image suffix, recursively, sorted.
        follow_symlinks: Follow symlinks (to files or folders) whose target lies outside the
            folder being walked (default ``False``: they are reported in ``rejected``). Symlinks
            that stay inside are always followed. Files named explicitly are always read.

    Returns:
        A :class:`Collected`. A file reached twice (listed twice, or through a link to a file
        already listed) appears once in ``paths`` and again in ``duplicates``.
    """
    out = Collected()
    seen: set[str] = set()
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            candidates: Iterable[Path] = _walk(item, follow_symlinks, out)
        elif item.exists() or item.is_symlink():
            candidates = [item]
        else:
            out.missing.append((item, "missing"))
            continue
        for path in candidates:
            key = os.path.realpath(path)
            if key in seen:
                out.duplicates.append(path)
                continue
            seen.add(key)
            out.paths.append(path)
    return out
