"""The fast decode's resize (:mod:`memexport.runtime.resample`): normalised band weights, the centre
crop's geometry, and a chain closer to the exact path than PIL's bilinear on the shrunk image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from memexport.core.spec import RESMEM
from memexport.runtime import preprocess as pre
from memexport.runtime import resample

SPEC = RESMEM.preprocess


def test_band_weights_cover_every_output_and_sum_to_one():
    parts = resample.blocks(1008, 256, 14, 227)
    assert [p[0] for p in parts] == list(range(0, 227, resample.BLOCK)) and parts[-1][1] == 227
    for start, end, low, high, weights in parts:
        assert weights.shape == (end - start, high - low) and weights.dtype == np.float32
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
        assert (weights >= 0).all()


def test_constant_and_linear_images_keep_their_values_at_the_crop():
    flat = np.full((756, 1008, 3), 91, np.uint8)
    np.testing.assert_allclose(resample.resize_crop(flat, (256, 256), 227), 91.0, rtol=1e-5)
    # A horizontal staircase (uint8 of x / 4): the symmetric filter returns its mean line at each centre.
    ramp = np.repeat(np.repeat((np.arange(1008) * 0.25).astype(np.uint8)[None, :, None], 756, 0), 3, 2)
    out = resample.resize_crop(ramp, (256, 256), 227)
    centres = (np.arange(14, 241) + 0.5) * (1008 / 256)
    assert out.shape == (3, 227, 227)
    np.testing.assert_allclose(out[0, 100], out[2, 5], rtol=1e-6)  # every row and channel alike
    assert np.abs(out[0, 0] - (0.25 * (centres - 0.5) - 0.375))[20:-20].max() < 0.01


def bilinear_weights(n_in: int, n_out: int, first: int, count: int) -> np.ndarray:
    """PIL's bilinear resize as a matrix (a triangle of half-width the scale, at pixel centres), no rounding."""
    scale = n_in / n_out
    centres = (np.arange(first, first + count) + 0.5) * scale
    weights = np.maximum(0.0, 1 - np.abs((np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / scale))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def test_the_dct_scaled_chain_is_closer_to_the_exact_filter_than_bilinear_on_the_shrunk_image(tmp_path, data_dir):
    """Against the exact path's filter computed in float (its uint8 rounding would blur the comparison)."""
    from tests.runtime.test_decode import camera_jpeg

    for name in ("china.jpg", "flower.jpg", "grace_hopper.jpg"):
        path = camera_jpeg(tmp_path / name, data_dir / name, size=(2048, 1536))
        full = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        rows, cols = bilinear_weights(1536, 256, 14, 227), bilinear_weights(2048, 256, 14, 227)
        exact = np.stack([rows @ full[:, :, c] @ cols.T for c in range(3)]) / 255
        fast = pre.preprocess(path, SPEC, decode="fast")
        drafted = pre.load_image(path, draft=SPEC.fast_decode_size())
        assert drafted.info.pop(pre.SHRUNK) and drafted.size == (1024, 768)
        plain = pre.preprocess_image(drafted, SPEC)  # PIL's bilinear on the same DCT-scaled pixels
        ours, theirs = float(np.abs(fast - exact).mean()), float(np.abs(plain - exact).mean())
        assert ours < 0.7 * theirs, (name, ours, theirs)


def test_every_matrix_product_stays_small_enough_for_the_calling_thread(monkeypatch):
    """Above OpenBLAS's threshold each product wakes BLAS threads, which fight the decoding threads."""
    pixels = np.random.default_rng(1).integers(0, 256, (756, 1008, 3), dtype=np.uint8)
    expected = resample.resize_crop(pixels, (256, 256), 227)
    sizes: list[int] = []
    real = np.matmul

    def recording(left, right, out=None):
        sizes.append(left.shape[0] * left.shape[1] * right.shape[1])
        return real(left, right, out=out)

    monkeypatch.setattr(resample.np, "matmul", recording)
    resample.blocks.cache_clear()
    np.testing.assert_array_equal(resample.resize_crop(pixels, (256, 256), 227), expected)
    assert sizes and max(sizes) <= resample.SINGLE_THREAD_MNK
    # The same result as one product per block would give.
    rows, cols = resample.blocks(756, 256, 14, 227), resample.blocks(1008, 256, 14, 227)
    dense_rows = np.zeros((227, 756), np.float32)
    for start, end, low, high, weights in rows:
        dense_rows[start:end, low:high] = weights
    dense_cols = np.zeros((227, 1008), np.float32)
    for start, end, low, high, weights in cols:
        dense_cols[start:end, low:high] = weights
    reference = np.stack([dense_rows @ pixels[:, :, c].astype(np.float32) @ dense_cols.T for c in range(3)])
    np.testing.assert_allclose(expected, reference, rtol=0, atol=2e-3)
