"""Write N seeded camera-size JPEGs (12 MP) from real photos, for decode and end-to-end benchmarks.

Usage:
    python tools/camera_photos.py OUT_DIR --source DIR [--source DIR ...] [--count 64] [--seed 0]
        [--portrait-every 4]

Each output is one source photo (chosen in turn, sorted by name, so every source is used), cropped
at a seeded 4:3 window (at least 70% of the source's shorter side), upscaled with Lanczos to
4032x3024 and given sensor-like noise: photon shot noise whose variance grows with the signal,
read noise, and coarser chroma noise (a Bayer sensor's colour noise after demosaicking spans a few
pixels), then saved as a phone would: JPEG quality 90, 4:2:0 chroma subsampling. Every
``--portrait-every``-th photo is a portrait: stored 4032x3024 with EXIF Orientation 6 (displayed
3024x4032), as phones store them. Seeded: the same command writes the same files; a file that exists
is kept. Sources are the photos memexport may use: ``../shared/images``, scikit-image samples
(``make photos``), OpenCV samples (``make heldout-photos``). Nothing is committed (``artifacts/`` is
git-ignored); each output names its source (``cam_00012_<source stem>.jpg``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 4032, 3024
SUFFIXES = (".jpg", ".jpeg", ".png")
# EXIF Orientation 6: the stored pixels are rotated 90 degrees counter-clockwise from the view;
# viewers rotate them 90 degrees clockwise (what a phone held upright writes).
ORIENTATION_TAG, ROTATE_CW = 0x0112, 6


def sources_in(folders: list[Path]) -> list[Path]:
    """Every photo in those ``folders`` that exist (not recursive), sorted by folder then name."""
    present = [folder for folder in folders if folder.is_dir()]
    for folder in folders:
        if folder not in present:
            print(f"skipping {folder}: not there (make photos / make heldout-photos write the optional ones)")
    found = [p for folder in present for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES and p.is_file()]
    if not found:
        raise SystemExit(f"no photos in {', '.join(map(str, folders))}; run `make photos` / `make heldout-photos` first")
    return found


def crop_window(size: tuple[int, int], aspect: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A seeded ``aspect`` (width/height) window covering 70-100% of the largest such window."""
    width, height = size
    full_w, full_h = (width, width / aspect) if width / height < aspect else (height * aspect, height)
    share = rng.uniform(0.7, 1.0)
    w, h = max(1, int(full_w * share)), max(1, int(full_h * share))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return left, top, left + w, top + h


def sensor_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (float32 HxWx3 in [0, 255]) with shot, read and chroma noise, as uint8."""
    gain = rng.uniform(0.6, 1.6)  # ISO: brighter noise on some photos than on others
    shot = np.sqrt(np.maximum(image, 0.0) * gain * 0.25)  # variance proportional to the signal
    noisy = image + shot * rng.standard_normal(image.shape, dtype=np.float32)
    noisy += rng.standard_normal(image.shape[:2], dtype=np.float32)[..., None] * (1.5 * gain)  # read noise, luminance
    h, w = image.shape[:2]
    chroma = rng.standard_normal((h // 4 + 1, w // 4 + 1, 3), dtype=np.float32) * (2.0 * gain)
    noisy += np.repeat(np.repeat(chroma, 4, axis=0), 4, axis=1)[:h, :w]
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def camera_photo(source: Path, portrait: bool, rng: np.random.Generator) -> Image.Image:
    """One 12 MP photo from ``source``: stored 4032x3024; a portrait's view is 3024x4032."""
    with Image.open(source) as opened:
        photo = opened.convert("RGB")
    view = (HEIGHT, WIDTH) if portrait else (WIDTH, HEIGHT)
    box = crop_window(photo.size, view[0] / view[1], rng)
    scene = np.asarray(photo.resize(view, Image.Resampling.LANCZOS, box=box), dtype=np.float32)
    pixels = Image.fromarray(sensor_noise(scene, rng))
    # A portrait is stored as the phone's sensor saw it: rotated back to landscape, tagged 6.
    return pixels.transpose(Image.Transpose.ROTATE_90) if portrait else pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, action="append", required=True, help="Folder of photos (repeatable).")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--portrait-every", type=int, default=4, help="Every Nth photo is an EXIF-rotated portrait (0: none).")
    args = parser.parse_args()
    sources = sources_in(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    for index in range(args.count):
        rng = np.random.default_rng([args.seed, index])  # per file, so any one can be rebuilt alone
        source = sources[index % len(sources)]
        portrait = args.portrait_every > 0 and index % args.portrait_every == args.portrait_every - 1
        path = args.out / f"cam_{index:05d}_{source.stem}.jpg"
        if path.exists():
            continue
        image = camera_photo(source, portrait, rng)
        exif = Image.Exif()
        if portrait:
            exif[ORIENTATION_TAG] = ROTATE_CW
        partial = path.with_suffix(".part")
        image.save(partial, "JPEG", quality=90, subsampling=2, exif=exif.tobytes())
        partial.replace(path)  # a killed run never leaves a truncated photo behind
    print(f"{args.count} camera photos ({WIDTH}x{HEIGHT}, quality 90, 4:2:0) in {args.out}")


if __name__ == "__main__":
    main()
