"""Random bytes and mutated image headers: the loader raises only InputImageError, or returns a valid input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from memexport.core.errors import InputImageError
from memexport.runtime.preprocess import preprocess
from memexport.core.spec import RESMEM

SPEC = RESMEM.preprocess
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def seeds() -> dict[str, bytes]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = {}
    for fmt, ext, extra in (("PNG", "png", {}), ("JPEG", "jpg", {}), ("GIF", "gif", {}), ("BMP", "bmp", {}), ("TIFF", "tif", {}), ("WEBP", "webp", {})):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **extra)
        out[ext] = buffer.getvalue()
    return out


SEEDS = seeds()


def check(tmp_path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"fuzz.{suffix}"
    path.write_bytes(data)
    try:
        x = preprocess(path, SPEC)
    except InputImageError as error:
        assert error.reason and "fuzz" in str(error) and "\n" not in str(error)
        return
    assert x.shape == (3, 227, 227) and x.dtype == np.float32 and np.isfinite(x).all()


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(sorted(SEEDS)))
def test_random_bytes(tmp_path, data, suffix):
    check(tmp_path, data, suffix)


@FUZZ
@given(
    kind=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 95), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(1, 4000)),
)
def test_mutated_headers_and_truncations(tmp_path, kind, edits, cut):
    data = bytearray(SEEDS[kind])
    for offset, value in edits:  # the first 96 bytes hold every format's header
        if offset < len(data):
            data[offset] = value
    if cut is not None:
        data = data[: min(cut, len(data))]
    check(tmp_path, bytes(data), kind)


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_seeds_themselves_decode(tmp_path, kind):
    check(tmp_path, SEEDS[kind], kind)
    assert preprocess((tmp_path / f"fuzz.{kind}"), SPEC).shape == (3, 227, 227)
