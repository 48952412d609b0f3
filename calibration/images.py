"""Streaming calibration images through exactly the runtime's preprocessing.

Calibration sets can be far bigger than memory, so images are read one batch at a time and
never kept. The split between calibration and held-out images is decided from each file's
name alone, so it is the same on every run and independent of folder order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from memexport.core.errors import CalibrationError, InputImageError
from memexport.core.spec import PreprocessSpec


@dataclass(frozen=True)
class ImageSplit:
    """Calibration images and the held-out images the fidelity guard checks on.

    Attributes:
        calibration: Images whose activations set the ranges.
        held_out: Images never used for ranges; the guard compares INT8 with FP32 on them.
    """

    calibration: tuple[Path, ...]
    held_out: tuple[Path, ...]


def _bucket(path: Path) -> float:
    digest = hashlib.sha1(path.name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_images(paths: Sequence[Path], held_out_fraction: float = 0.25, min_held_out: int = 2) -> ImageSplit:
    """Split images into calibration and held-out sets by a hash of the file name.

    Args:
        paths: Image files.
        held_out_fraction: Share of images held out (default 0.25); 0 disables the split.
        min_held_out: At least this many images are held out when the fraction is positive
            and there are enough images (default 2).

    Raises:
        CalibrationError: When no image is left for calibration.
    """
    paths = list(paths)
    if held_out_fraction <= 0:
        return ImageSplit(tuple(paths), ())
    ranked = sorted(paths, key=lambda p: (_bucket(p), str(p)))
    count = max(int(round(len(paths) * held_out_fraction)), min(min_held_out, len(paths) - 1))
    held = set(map(str, ranked[:count]))
    calibration = tuple(p for p in paths if str(p) not in held)
    held_out = tuple(p for p in paths if str(p) in held)
    if not calibration:
        raise CalibrationError(f"no calibration images left after holding out {len(held_out)}; pass a folder with more images")
    return ImageSplit(calibration, held_out)


def augmented_views(image, count: int, seed: int) -> list:
    """The image and ``count`` augmented views (mirror, then random crops of 70-95% of each side).

    Two uses. For calibration images, augmentation widens the activation statistics of a small
    set. For the fidelity estimate's evidence (held-out images, and each cross-validation fold's
    images) the views are extra error samples: a view of an image the scoring build never saw is
    as unseen as the image itself, since no view of it entered that build's statistics. The views
    of one image share most of their error, so the estimate counts images, not views, as its
    degrees of freedom (:mod:`memexport.calibration.fidelity`); the views only steady the error's
    spread. (An earlier docstring said held-out images were never augmented; the code always
    augmented them, and that is the right behaviour.)
    """
    from PIL import Image, ImageOps

    views = [image]
    rng = np.random.default_rng(seed)
    for index in range(count):
        view = ImageOps.mirror(image) if index % 2 == 0 else image
        width, height = view.size
        if index > 0 and width > 8 and height > 8:
            side = rng.uniform(0.7, 0.95)
            w, h = max(1, int(width * side)), max(1, int(height * side))
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            view = view.crop((left, top, left + w, top + h))
        views.append(view if isinstance(view, Image.Image) else image)
    return views


def iter_batches(
    paths: Sequence[Path],
    spec: PreprocessSpec,
    batch_size: int = 8,
    augment: int = 0,
    on_skip: Callable[[InputImageError], None] = lambda _: None,
) -> Iterator[np.ndarray]:
    """Yield float32 NCHW batches, preprocessed exactly as the runtime does.

    Args:
        paths: Image files, read lazily one at a time.
        spec: The artifact's preprocessing.
        batch_size: Images per batch (default 8).
        augment: Extra augmented views per image (default 0).
        on_skip: Called for each unreadable image, which is then skipped (default: silent).
    """
    from memexport.runtime.preprocess import load_image, preprocess_image

    pending: list[np.ndarray] = []
    for index, path in enumerate(paths):
        try:
            image = load_image(path)
            views = augmented_views(image, augment, seed=index) if augment else [image]
            arrays = [preprocess_image(view, spec) for view in views]
        except InputImageError as error:
            on_skip(error)
            continue
        except (OSError, ValueError, SyntaxError) as exc:
            on_skip(InputImageError(str(path), "corrupt", f"image data is corrupt ({type(exc).__name__}); remove the file"))
            continue
        pending.extend(arrays)
        while len(pending) >= batch_size:
            yield np.stack(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield np.stack(pending)


def load_all(paths: Sequence[Path], spec: PreprocessSpec, on_skip: Callable[[InputImageError], None] = lambda _: None) -> np.ndarray:
    """Preprocess a small set (the held-out images) into one array; empty ``(0, ...)`` if none load."""
    batches = list(iter_batches(paths, spec, batch_size=64, on_skip=on_skip))
    if not batches:
        return np.zeros((0, 3, spec.crop, spec.crop), dtype=np.float32)
    return np.concatenate(batches)
