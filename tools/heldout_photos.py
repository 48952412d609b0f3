"""Fetch real photographs for INT8 held-out checks: OpenCV's sample photos, from its PyPI sdist.

Usage: python tools/heldout_photos.py OUT_DIR

The images are read out of the ``opencv-python`` source distribution (the only place on PyPI,
the one registry reachable here, that carries them), checked against PyPI's sha256, and copied
into ``OUT_DIR`` (git-ignored, never committed, never fetched at run time). Only photographs of
distinct scenes are taken: no logos, drawings, renders, charts or near-duplicate stereo/motion pairs.
The files stay under their upstream terms (OpenCV's ``samples/data``, Apache-2.0 repository;
some images are long-standing test images of their own provenance); ``OUT_DIR/SOURCE.txt`` says so.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE, VERSION = "opencv-python", "5.0.0.93"
PHOTOS = (
    "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png", "blox.jpg", "board.jpg",
    "box_in_scene.png", "building.jpg", "butterfly.jpg", "castle.jpg", "chicky_512.png", "ela_original.jpg",
    "fruits.jpg", "gauge-1.jpg", "graf1.png", "home.jpg", "left01.jpg", "lena.jpg", "leuvenA.jpg",
    "licenseplate_motion.jpg", "mcc_ccm_test.jpg", "messi5.jpg", "orange.jpg", "pca_test1.jpg",
    "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg", "sudoku.png",
    "text_defocus.jpg",
)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(".cache/sdist")
    cache.mkdir(parents=True, exist_ok=True)
    # The package-level JSON (the per-version endpoint is not served through every mirror).
    index = f"https://pypi.org/pypi/{PACKAGE}/json"
    with urllib.request.urlopen(index, timeout=60) as response:
        release = json.load(response)["releases"][VERSION]
    (sdist,) = [f for f in release if f["packagetype"] == "sdist"]
    archive = cache / sdist["filename"]
    if not archive.is_file() or hashlib.sha256(archive.read_bytes()).hexdigest() != sdist["digests"]["sha256"]:
        print(f"downloading {sdist['filename']} ({sdist['size'] / 1e6:.0f} MB) from PyPI")
        # Some PyPI mirrors answer with file URLs relative to the JSON's own address.
        urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != sdist["digests"]["sha256"]:
        sys.exit(f"{archive}: sha256 {digest} does not match PyPI's {sdist['digests']['sha256']}; delete it and run again")
    prefix = f"{sdist['filename'][: -len('.tar.gz')]}/opencv/samples/data/"
    with tarfile.open(archive) as tar:
        for name in PHOTOS:
            member = tar.getmember(prefix + name)
            (out / name).write_bytes(tar.extractfile(member).read())
    (out / "SOURCE.txt").write_text(
        f"{len(PHOTOS)} photographs from {sdist['filename']} (PyPI), opencv/samples/data/, unchanged.\n"
        "Upstream terms apply (OpenCV repository: Apache-2.0; some are classic test images of their own provenance).\n"
        "Used only to measure INT8 rank fidelity; never committed.\n"
    )
    print(f"wrote {len(PHOTOS)} photos to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.splitlines()[2])
    main(sys.argv[1])
