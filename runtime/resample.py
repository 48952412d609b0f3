"""The fast decode's resize: from a shrunk image straight to the model's centre crop, in float32 CHW.

``--decode exact`` resizes the full-size image with PIL's bilinear filter: for each output pixel, a
triangle whose half-width is the scale ``s`` (input pixels per output pixel), sampled at the input
pixel centres. ``--decode fast`` first shrinks the image by an integer factor (a JPEG's DCT scale, or
a box reduction), so each of its pixels is close to the mean of the full-size pixels it covers. Resizing
that shrunk image with the same triangle blurs more than the exact path does: the shrinking already
averaged each pixel's footprint.

This module weights each shrunk pixel by the triangle's integral over its footprint (what the exact
filter gives a piecewise-constant image), with the half-width narrowed to ``s * sqrt(1 - 1/s**2)``
so that the whole chain has the exact filter's variance: a footprint (a box of one shrunk pixel,
variance 1/12), the integration (another 1/12) and the triangle (``a**2 / 6``) add up to the exact
``s**2 / 6``. The rule is derived, not fitted. On 12 MP camera photos it halved the score error
against exact decoding compared with PIL's bilinear on the shrunk image (docs/throughput.md).

Only the crop's rows and columns are computed, as float32 matrix products over blocks of 16 output
rows or columns (each touches a narrow band of the input), each product small enough to run on the
calling thread, which costs less than PIL's resize of the whole image.
"""

from __future__ import annotations

import functools

import numpy as np

# Output rows (or columns) per matrix product: a band of the input narrow enough that the products
# stay small, wide enough that numpy's per-call overhead does not dominate.
BLOCK = 16

# Largest m*n*k of one matrix product. OpenBLAS (numpy's BLAS) runs a product on the calling thread
# only below 4 * 65536; above it, it wakes its own thread pool, and two decoding threads doing so at
# once halved the fast decode's images/s on 2 cores (28 vs 57). The decoding threads are the parallelism.
SINGLE_THREAD_MNK = 4 * 65536

Block = tuple[int, int, int, int, np.ndarray]


def _triangle_cdf(x: np.ndarray) -> np.ndarray:
    """The integral of the unit triangle ``max(0, 1 - |t|)`` from -1 to ``x``."""
    x = np.clip(x, -1.0, 1.0)
    return np.where(x < 0, 0.5 * (1 + x) ** 2, 1 - 0.5 * (1 - x) ** 2)


@functools.lru_cache(maxsize=64)
def blocks(n_in: int, n_out: int, first: int, count: int) -> tuple[Block, ...]:
    """Weights mapping ``n_in`` shrunk pixels to outputs ``first .. first + count`` of ``n_out``.

    Returns:
        ``(out_start, out_end, in_start, in_end, weights)`` per block of :data:`BLOCK` outputs, the
        weights a float32 ``(out_end - out_start, in_end - in_start)`` matrix whose rows sum to 1.
    """
    scale = n_in / n_out
    half = scale * np.sqrt(1.0 - 1.0 / scale**2) if scale > 1 else 1.0
    centres = (np.arange(first, first + count) + 0.5) * scale
    edges = np.arange(n_in + 1)[None, :]
    cdf = _triangle_cdf((edges - centres[:, None]) / half)
    weights = cdf[:, 1:] - cdf[:, :-1]
    weights /= weights.sum(axis=1, keepdims=True)
    out = []
    for start in range(0, count, BLOCK):
        end = min(start + BLOCK, count)
        used = np.nonzero(weights[start:end].any(axis=0))[0]
        low, high = int(used[0]), int(used[-1]) + 1
        out.append((start, end, low, high, np.ascontiguousarray(weights[start:end, low:high], dtype=np.float32)))
    return tuple(out)


def resize_crop(pixels: np.ndarray, size: tuple[int, int], crop: int) -> np.ndarray:
    """The centre ``crop`` x ``crop`` of ``pixels`` resized to ``size``, as float32 CHW in pixel units.

    Args:
        pixels: A shrunk image, uint8 ``HxWxC``, at least ``size`` on each side.
        size: ``(height, width)`` of the resize the crop is taken from (the model spec's ``resize``).
        crop: Side of the centre crop, offset as torchvision's ``CenterCrop`` rounds it.
    """
    top, left = centre_offset(size, crop)
    return resize_window(pixels, size, (top, left, crop, crop))


def centre_offset(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """``(top, left)`` of a centre ``crop`` in an image of ``size`` (height, width), rounded as
    torchvision's ``CenterCrop`` rounds it: ``int(round((size - crop) / 2))``, Python's round-half-even."""
    return int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))


def resize_window(pixels: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """The ``window`` of ``pixels`` resized to ``size``, as float32 CHW in pixel units.

    Only the window's rows and columns are computed: several models whose centre crops differ share one
    window that covers them all (see :func:`memexport.runtime.preprocess.model_inputs`).

    Args:
        pixels: A shrunk image, uint8 ``HxWxC``, at least ``size`` on each side.
        size: ``(height, width)`` of the whole resize.
        window: ``(top, left, height, width)`` of the part of the resize to compute.
    """
    height, width, channels = pixels.shape
    top, left, rows_out, cols_out = window
    flat = pixels.reshape(height, width * channels)
    rows = np.empty((rows_out, width * channels), np.float32)
    for start, end, low, high, weights in blocks(height, size[0], top, rows_out):
        _product(weights, flat[low:high].astype(np.float32), rows[start:end])
    # Columns with the channels kept interleaved: each block's weights act on every channel alike
    # (``kron`` with the identity), which spares transposing the wide intermediate.
    out = np.empty((rows_out, cols_out * channels), np.float32)
    for start, end, low, high, weights in _interleaved(width, size[1], left, cols_out, channels):
        _product(rows[:, low:high], weights, out[:, start:end])
    return np.ascontiguousarray(out.reshape(rows_out, cols_out, channels).transpose(2, 0, 1))


def _product(left: np.ndarray, right: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = left @ right``, in pieces of at most :data:`SINGLE_THREAD_MNK` (see there)."""
    m, k = left.shape
    n = right.shape[1]
    if n >= m:  # split the wider side
        step = max(1, SINGLE_THREAD_MNK // (m * k))
        for j in range(0, n, step):
            np.matmul(left, right[:, j : j + step], out=out[:, j : j + step])
    else:
        step = max(1, SINGLE_THREAD_MNK // (n * k))
        for i in range(0, m, step):
            np.matmul(left[i : i + step], right, out=out[i : i + step])


@functools.lru_cache(maxsize=64)
def _interleaved(n_in: int, n_out: int, first: int, count: int, channels: int) -> tuple[Block, ...]:
    """:func:`blocks` for ``channels`` interleaved values per pixel, transposed for a right product."""
    eye = np.eye(channels, dtype=np.float32)
    return tuple((start * channels, end * channels, low * channels, high * channels, np.ascontiguousarray(np.kron(weights, eye).T))
                 for start, end, low, high, weights in blocks(n_in, n_out, first, count))
