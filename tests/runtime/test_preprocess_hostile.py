"""Broken, hostile and unusual images: each is refused with its reason, or scored like the original code."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from memexport.core.errors import InputImageError
from memexport.runtime import preprocess as preprocess_module
from memexport.runtime.preprocess import load_image, preprocess, preprocess_image
from memexport.core.spec import RESMEM
from tests.runtime.hostile_images import BAD_REASONS, GOOD_MODES, write_bad_inputs, write_good_modes, write_non_utf8

SPEC = RESMEM.preprocess


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("hostile") / "images"
    folder.mkdir()
    write_bad_inputs(folder, data_dir, folder.parent / "outside")
    write_good_modes(folder)
    return folder


@pytest.mark.parametrize("name", sorted(set(BAD_REASONS) - {"link_outside.jpg"}))
def test_each_broken_file_raises_its_typed_reason_naming_the_file(hostile, name):
    with pytest.raises(InputImageError) as caught:
        preprocess(hostile / name, SPEC)
    assert caught.value.reason == BAD_REASONS[name]
    assert name in str(caught.value) and "\n" not in str(caught.value)


def test_bomb_is_refused_before_decoding(hostile, monkeypatch):
    # If the 64 MP guard failed, load() would be reached; make that observable.
    def fail(self):
        raise AssertionError("decoder ran on a decompression bomb")

    monkeypatch.setattr(Image.Image, "load", fail)
    with pytest.raises(InputImageError, match="9000x8000"):
        preprocess(hostile / "bomb_mid.png", SPEC)


@pytest.mark.parametrize("name", GOOD_MODES)
def test_every_mode_is_scored_like_pil_convert_rgb(hostile, name):
    x = preprocess(hostile / name, SPEC)
    assert x.shape == (3, 227, 227) and x.dtype == np.float32 and np.isfinite(x).all()
    assert 0.0 <= x.min() and x.max() <= 1.0
    with Image.open(hostile / name) as image:
        image.load()
        mode = image.mode
        if mode not in ("I;16", "I"):  # parity: the original converts with PIL's convert('RGB')
            np.testing.assert_array_equal(x, preprocess_image(image.convert("RGB"), SPEC))
        else:  # 16-bit grey: scaled to 8 bits (PIL's convert clips), same as an 8-bit grey copy
            grey8 = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0 + 0.5).astype(np.uint8), "L")
            np.testing.assert_allclose(x, preprocess_image(grey8, SPEC), atol=1.01 / 255)


def test_animated_gif_scores_its_first_frame(hostile):
    with Image.open(hostile / "animated.gif") as gif:
        assert getattr(gif, "n_frames", 1) == 2
        gif.seek(0)
        first = gif.convert("RGB")
        gif.seek(1)
        second = gif.convert("RGB")
    x = preprocess(hostile / "animated.gif", SPEC)
    np.testing.assert_array_equal(x, preprocess_image(first, SPEC))
    assert not np.array_equal(x, preprocess_image(second, SPEC))


def test_exif_orientation_ignored_by_default_and_applied_on_request(hostile):
    raw = load_image(hostile / "exif6.jpg")
    assert raw.size == (96, 80)  # parity: the original code does not rotate
    turned = load_image(hostile / "exif6.jpg", exif_transpose=True)
    assert turned.size == (80, 96)
    with Image.open(hostile / "exif6.jpg") as image:
        np.testing.assert_array_equal(np.asarray(turned), np.asarray(image.convert("RGB").transpose(Image.Transpose.ROTATE_270)))
    assert not np.array_equal(preprocess(hostile / "exif6.jpg", SPEC), preprocess(hostile / "exif6.jpg", SPEC, exif_transpose=True))


def test_unreadable_file_is_reported_not_raised(hostile, data_dir, monkeypatch):
    # Tests run as root, where chmod 000 does not stop reads: simulate EACCES at open().
    target = hostile / "locked.jpg"
    target.write_bytes((data_dir / "china.jpg").read_bytes())
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if os.fspath(path) == os.fspath(target):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(preprocess_module.os, "open", deny)
    with pytest.raises(InputImageError) as caught:
        preprocess(target, SPEC)
    assert caught.value.reason == "unreadable" and "Permission denied" in caught.value.detail


def test_folder_named_like_an_image_is_not_a_file(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(InputImageError) as caught:
        preprocess(tmp_path / "x.jpg", SPEC)
    assert caught.value.reason == "not-a-file"


def test_non_utf8_file_name_loads(tmp_path, data_dir):
    path = write_non_utf8(tmp_path, data_dir)
    assert os.fsencode(path.name) == b"caf\xe9-latin1.png"
    np.testing.assert_array_equal(preprocess(path, SPEC), preprocess(data_dir / "phantom.png", SPEC))


def test_bad_arrays_and_types_are_typed_errors():
    for bad in (np.zeros((4, 4), np.float32), np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 2), np.uint8)):
        with pytest.raises(InputImageError):
            preprocess(bad, SPEC)
    with pytest.raises(InputImageError):
        preprocess(12345, SPEC)  # type: ignore[arg-type]
