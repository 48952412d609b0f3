"""Preprocessing matches resmem's torchvision transformer, written out in plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from memexport.runtime.preprocess import load_image, preprocess, preprocess_image
from memexport.core.spec import RESMEM

SPEC = RESMEM.preprocess


def reference_transform(image: Image.Image) -> np.ndarray:
    """torchvision's Resize((256,256)) + CenterCrop(227) + ToTensor, restated independently."""
    resized = image.convert("RGB").resize((256, 256), Image.BILINEAR)
    # CenterCrop: crop_top = int(round((256 - 227) / 2.0)) = int(round(14.5)) = 14
    cropped = resized.crop((14, 14, 14 + 227, 14 + 227))
    return (np.asarray(cropped, dtype=np.float32) / 255.0).transpose(2, 0, 1)


def test_output_shape_dtype_and_range(sample_images):
    x = preprocess(sample_images[0], SPEC)
    assert x.shape == (3, 227, 227) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_matches_torchvision_semantics_on_every_sample(sample_images):
    for path in sample_images:
        with Image.open(path) as image:
            expected = reference_transform(image)
        np.testing.assert_allclose(preprocess(path, SPEC), expected, atol=1e-7, err_msg=str(path))


def test_crop_offset_is_14_as_torchvision_rounds_it():
    # A 256x256 gradient passes through the resize unchanged, so the crop origin is visible.
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    image = Image.fromarray(np.stack([ramp, ramp.T, ramp], axis=2))
    x = preprocess_image(image, SPEC)
    assert x[0, 0, 0] == pytest.approx(14 / 255) and x[1, 0, 0] == pytest.approx(14 / 255)
    assert x[0, 0, -1] == pytest.approx((14 + 226) / 255)


def test_paths_pil_images_and_arrays_agree(sample_images):
    path = sample_images[0]
    with Image.open(path) as image:
        image.load()
        as_array = np.asarray(image.convert("RGB"))
        from_pil = preprocess(image, SPEC)
    np.testing.assert_array_equal(preprocess(path, SPEC), from_pil)
    np.testing.assert_array_equal(preprocess(str(path), SPEC), preprocess(as_array, SPEC))


def test_greyscale_and_rgba_are_converted_like_pil_convert_rgb(data_dir):
    grey = load_image(data_dir / "chessboard_GRAY.png")
    rgba = load_image(data_dir / "logo.png")
    assert grey.mode == "L" and rgba.mode == "RGBA"
    x = preprocess(grey, SPEC)
    np.testing.assert_array_equal(x[0], x[1])  # grey replicated into three channels
    np.testing.assert_allclose(preprocess(rgba, SPEC), reference_transform(rgba), atol=1e-7)
