"""``--decode fast``: DCT-scaled JPEG decoding, box-reduced other formats, EXIF, the pixel cap, and the run's identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memexport.core.errors import InputImageError, UsageError
from memexport.core.spec import RESMEM
from memexport.runtime import preprocess as pre
from memexport.runtime.batch import PredictOptions, read_scores_file, scores_csv_from_images
from memexport.runtime.predictor import Predictor
from tests.scoring import rows

SPEC = RESMEM.preprocess
CPU = {"device": "cpu"}


def camera_jpeg(path: Path, photo: Path, size: tuple[int, int] = (2016, 1512), orientation: int | None = None) -> Path:
    """A real photo upscaled to ``size`` with seeded noise, saved as a phone does (quality 90, 4:2:0)."""
    base = np.asarray(Image.open(photo).convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = np.random.default_rng(0).normal(0, 6, base.shape).astype(np.int16)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=90, subsampling=2, exif=exif.tobytes())
    return path


@pytest.fixture(scope="module")
def camera(tmp_path_factory, data_dir) -> Path:
    folder = tmp_path_factory.mktemp("camera")
    for name in ("china.jpg", "flower.jpg", "grace_hopper.jpg", "motorcycle_right.png"):
        camera_jpeg(folder / f"{Path(name).stem}.jpg", data_dir / name)
    return folder


def test_fast_decodes_jpegs_at_the_smallest_dct_scale_keeping_twice_the_resize(camera):
    path = camera / "china.jpg"
    assert pre.load_image(path).size == (2016, 1512)
    # 2016x1512 against 512x512: 1/2 keeps 1008x756; 1/4 (504x378) would not.
    assert pre.load_image(path, draft=SPEC.fast_decode_size()).size == (1008, 756)
    assert SPEC.fast_decode_size() == (512, 512)


def test_fast_is_close_to_exact_and_exact_is_untouched(camera):
    for path in sorted(camera.iterdir()):
        exact, fast = pre.preprocess(path, SPEC), pre.preprocess(path, SPEC, decode="fast")
        assert np.array_equal(exact, pre.preprocess(path, SPEC, decode="exact"))
        assert not np.array_equal(exact, fast)  # the draft really changed the pixels
        assert float(np.abs(exact - fast).mean()) < 0.01, path.name


def test_other_formats_are_box_reduced_before_the_same_resize(tmp_path, data_dir):
    photo = Image.open(data_dir / "china.jpg").convert("RGB").resize((2048, 1536), Image.Resampling.BICUBIC)
    photo.save(tmp_path / "big.png")
    exact, fast = pre.preprocess(tmp_path / "big.png", SPEC), pre.preprocess(tmp_path / "big.png", SPEC, decode="fast")
    assert not np.array_equal(exact, fast)
    assert float(np.abs(exact - fast).mean()) < 0.01
    # A small image has nothing to reduce: both modes give the same pixels.
    small = data_dir / "motorcycle_right.png"
    assert np.array_equal(pre.preprocess(small, SPEC), pre.preprocess(small, SPEC, decode="fast"))


def test_exif_orientation_applies_after_the_draft(tmp_path, data_dir):
    # A phone portrait: stored landscape, tagged "rotate 90 clockwise to view".
    path = camera_jpeg(tmp_path / "portrait.jpg", data_dir / "grace_hopper.jpg", orientation=6)
    assert pre.load_image(path, exif_transpose=True, draft=SPEC.fast_decode_size()).size == (756, 1008)
    exact = pre.preprocess(path, SPEC, exif_transpose=True)
    fast = pre.preprocess(path, SPEC, exif_transpose=True, decode="fast")
    unrotated = pre.preprocess(path, SPEC, decode="fast")
    assert float(np.abs(exact - fast).mean()) < 0.01
    assert float(np.abs(exact - unrotated).mean()) > 5 * float(np.abs(exact - fast).mean())


def test_the_pixel_cap_judges_the_header_not_the_drafted_size(camera, monkeypatch):
    path = camera / "china.jpg"
    monkeypatch.setattr(pre, "MAX_PIXELS", 2016 * 1512 - 1)  # the drafted 1008x756 would fit
    for decode in ("exact", "fast"):
        with pytest.raises(InputImageError, match="declares 2016x1512 pixels") as error:
            pre.preprocess(path, SPEC, decode=decode)
        assert error.value.reason == "too-large"
    with pytest.raises(InputImageError, match="declares 2016x1512"):
        pre.preprocess_bytes(path.read_bytes(), "china.jpg", SPEC, decode="fast")


def test_an_unknown_mode_is_one_clear_line(camera, tiny):
    with pytest.raises(UsageError, match="--decode must be one of exact, fast, got 'quick'"):
        pre.preprocess(camera / "china.jpg", SPEC, decode="quick")
    with pytest.raises(UsageError, match="--decode must be one of"):
        Predictor(tiny, device="cpu", decode="quick")


def test_predictor_bytes_and_paths_agree_in_fast_mode(camera, tiny):
    path = camera / "flower.jpg"
    with Predictor(tiny, device="cpu", decode="fast") as predictor:
        assert np.array_equal(predictor.preprocess(path), predictor.preprocess_bytes(path.read_bytes(), str(path)))
        assert np.array_equal(predictor.preprocess(path), pre.preprocess(path, SPEC, decode="fast"))


def test_the_csv_names_the_decode_mode_and_resume_never_mixes_modes(camera, tiny, tmp_path):
    out = tmp_path / "s.csv"
    images = sorted(camera.iterdir())
    summary = scores_csv_from_images(tiny, images[:2], out, PredictOptions(decode="fast", **CPU))
    assert rows(out)[0] == ["path", "model", "score", "backend", "precision", "decode"]
    assert [r[3:] for r in rows(out)[1:]] == [["onnxruntime", "fp32", "fast"]] * 2
    assert summary.decode == "fast"
    with pytest.raises(UsageError, match=r"holds scores computed by onnxruntime fp32, fast decode; this run computes onnxruntime fp32, exact decode"):
        scores_csv_from_images(tiny, images, out, PredictOptions(resume=True, **CPU))
    summary = scores_csv_from_images(tiny, images, out, PredictOptions(resume=True, decode="fast", **CPU))
    assert (summary.skipped, summary.scored) == (2, len(images) - 2)
    assert read_scores_file(out).runs == {("onnxruntime", "fp32", "fast")}


def test_files_from_before_the_decode_column_resume_as_exact_only(camera, tiny, tmp_path):
    out = tmp_path / "old.csv"
    first = sorted(camera.iterdir())[0]
    out.write_text(f"path,score,backend,precision\n{first},0.50000000,onnxruntime,fp32\n")
    assert read_scores_file(out).runs == {("onnxruntime", "fp32", "exact")}
    with pytest.raises(UsageError, match="computed by onnxruntime fp32, exact decode; this run computes onnxruntime fp32, fast decode"):
        scores_csv_from_images(tiny, sorted(camera.iterdir()), out, PredictOptions(resume=True, decode="fast", **CPU))
    summary = scores_csv_from_images(tiny, sorted(camera.iterdir()), out, PredictOptions(resume=True, **CPU))
    assert summary.skipped == 1 and summary.scored == len(list(camera.iterdir())) - 1
    assert {len(r) for r in rows(out)} == {4}  # the file keeps its own four columns
