"""Builds folders of broken, hostile and unusual images for the reliability tests.

Each builder writes real bytes (no mocks): truncations of real photos from tests/data,
PNG headers patched to declare huge sizes, every awkward PIL mode, symlinks that leave the
folder, a FIFO, and a file name that is not UTF-8.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> reason the errors file must give
BAD_REASONS = {
    "zero.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text.jpg": "not-an-image",
    "bomb.png": "too-large",
    "bomb.jpg": "too-large",
    "bomb_mid.png": "too-large",
    "eps.jpg": "not-an-image",
    "fifo.jpg": "not-a-file",
    "link_outside.jpg": "symlink-outside",
    "dangling.jpg": "missing",
}
# unusual but valid: each must be scored
GOOD_MODES = ("i16.png", "i16.tif", "cmyk.jpg", "la.png", "p.png", "animated.gif", "exif6.jpg", "rgb16.png")
NON_UTF8_NAME = b"caf\xe9-latin1.png"


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` but carries one tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG with its SOF0 frame size patched to ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def smooth_rgb(seed: int, size: tuple[int, int] = (96, 80)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR))


def write_good_modes(folder: Path) -> None:
    base = smooth_rgb(1)
    grey16 = (np.asarray(Image.fromarray(base).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "i16.png")  # PIL opens 16-bit grey PNG as I;16
    Image.fromarray(grey16).save(folder / "i16.tif")
    Image.fromarray(base).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(base).convert("LA").save(folder / "la.png")
    Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "p.png")
    frames = [Image.fromarray(smooth_rgb(2)).convert("P"), Image.fromarray(smooth_rgb(3)).convert("P")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW when displayed
    Image.fromarray(base).save(folder / "exif6.jpg", exif=exif, quality=95)
    # 16-bit-per-channel RGB PNG, hand-written (PIL cannot write it); PIL reads it as 8-bit RGB.
    rgb16 = (base.astype(">u2") * 257).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rgb16)
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    h, w = rgb16.shape[:2]
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    (folder / "rgb16.png").write_bytes(png)


def write_bad_inputs(folder: Path, data_dir: Path, outside: Path) -> None:
    """Every broken kind in BAD_REASONS, under ``folder``; ``outside`` is a folder beside it."""
    (folder / "zero.jpg").write_bytes(b"")
    jpeg = (data_dir / "flower.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    png = (data_dir / "brick.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "text.jpg").write_text("hello, I am a text file with an image suffix\n")
    (folder / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    (folder / "bomb.jpg").write_bytes(jpeg_declaring(60_000, 60_000))
    (folder / "bomb_mid.png").write_bytes(png_declaring(9_000, 8_000))  # over memexport's 64 MP, under PIL's 178 MP
    (folder / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    os.mkfifo(folder / "fifo.jpg")
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.jpg"
    secret.write_bytes((data_dir / "china.jpg").read_bytes())
    os.symlink(secret, folder / "link_outside.jpg")
    os.symlink(folder / "no-such-target.jpg", folder / "dangling.jpg")


def write_non_utf8(folder: Path, data_dir: Path) -> Path:
    """A valid image whose file name is not UTF-8; returns its path (surrogate-escaped str)."""
    name = os.fsdecode(NON_UTF8_NAME)
    path = folder / name
    path.write_bytes((data_dir / "phantom.png").read_bytes())
    return path
