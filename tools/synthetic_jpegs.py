"""Write N synthetic photo-like JPEGs for the end-to-end benchmark (``make synthetic-images``).

Sizes vary between 480x360 and 800x600 (typical web photos; LaMem's are smaller), content
is smooth colour fields plus noise so JPEG decoding costs what a real photo costs. Seeded:
the same command writes the same files.

    python tools/synthetic_jpegs.py OUT_DIR [--count 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_jpeg(rng: np.random.Generator) -> Image.Image:
    width = int(rng.integers(480, 801))
    height = int(width * rng.uniform(0.7, 0.8))
    coarse = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for index in range(args.count):
        path = args.out / f"synthetic_{index:05d}.jpg"
        image = synthetic_jpeg(rng)  # drawn even when the file exists, so seeds stay aligned
        if not path.exists():
            image.save(path, "JPEG", quality=90)
    print(f"{args.count} JPEGs in {args.out}")


if __name__ == "__main__":
    main()
