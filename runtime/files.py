"""Collecting image files from paths and folders."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"})


@dataclass
class Collected:
    """Files to score, plus inputs that could not be listed.

    Attributes:
        paths: Image paths in order: arguments in the order given, folders walked recursively and sorted.
        missing: ``(path, reason)`` for arguments that do not exist or cannot be read.
        duplicates: Paths listed more than once (each is scored once).
    """

    paths: list[Path] = field(default_factory=list)
    missing: list[tuple[Path, str]] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)


def _walk(folder: Path, follow_symlinks: bool) -> Iterable[Path]:
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=follow_symlinks):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.is_symlink() and not follow_symlinks:
                target = path.resolve()
                if root not in target.parents:
                    yield path  # reported by the loader as leaving the folder
                    continue
            yield path


def collect_images(inputs: Iterable[Path | str], follow_symlinks: bool = False) -> Collected:
    """Expand files and folders into image paths.

    Args:
        inputs: Files and folders. Files are kept whatever their suffix; folders contribute
            files with an image suffix, recursively, sorted.
        follow_symlinks: Follow symlinked folders (default ``False``).
    """
    out = Collected()
    seen: set[str] = set()
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            candidates: Iterable[Path] = _walk(item, follow_symlinks)
        elif item.exists() or item.is_symlink():
            candidates = [item]
        else:
            out.missing.append((item, "missing"))
            continue
        for path in candidates:
            key = os.path.normpath(os.path.abspath(path))
            if key in seen:
                out.duplicates.append(path)
                continue
            seen.add(key)
            out.paths.append(path)
    return out
