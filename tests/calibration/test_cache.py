"""TensorRT calibration cache: the text format round-trips and rejects what TensorRT would."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memexport.calibration.cache import (
    calibration_cache_text,
    parse_calibration_cache,
    read_calibration_cache,
    scale_hex,
    tensorrt_version_number,
    write_calibration_cache,
)
from memexport.core.errors import ArtifactError, UsageError

names = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=40).filter(lambda s: s.strip() == s)
ranges = st.dictionaries(names, st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(ranges, st.sampled_from(["entropy", "minmax", "percentile"]))
def test_ranges_round_trip(values, method):
    parsed = parse_calibration_cache(calibration_cache_text(values, method))
    assert list(parsed.ranges) == list(values)
    for name, value in values.items():
        # float32 scale: the range comes back to float32 precision
        assert parsed.ranges[name] == pytest.approx(value, rel=2e-7)
    assert parsed.algorithm == ("MinMaxCalibration" if method == "minmax" else "EntropyCalibration2")
    assert parsed.version == 8601


def test_file_round_trip_and_exact_format(tmp_path):
    path = tmp_path / "model.calib.cache"
    write_calibration_cache(path, {"image": 1.0, "/conv1/Conv_output_0": 12.7}, "entropy", "10.3.0")
    lines = path.read_text().splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    # scale = range / 127, as big-endian float32 hex
    assert lines[1] == "image: " + struct.pack(">f", np.float32(1.0 / 127)).hex()
    assert lines[2] == "/conv1/Conv_output_0: 3dcccccd"  # 12.7 / 127 = 0.1f
    back = read_calibration_cache(path)
    assert back.ranges["/conv1/Conv_output_0"] == pytest.approx(12.7, rel=1e-7)
    assert back.version == 100300


def test_version_numbers_follow_tensorrt():
    assert tensorrt_version_number("8.6.1") == 8601
    assert tensorrt_version_number("8.5.3") == 8503
    assert tensorrt_version_number("10.0.1") == 100001
    with pytest.raises(UsageError):
        tensorrt_version_number("eight")


def test_scale_hex_is_big_endian_float32():
    assert scale_hex(127.0) == "3f800000"


@pytest.mark.parametrize(
    "text",
    ["", "TRT-8601\nx: 3f800000\n", "TRT-8601-EntropyCalibration2\nx 3f800000\n", "TRT-8601-EntropyCalibration2\nx: 3f8000\n", "TRT-8601-EntropyCalibration2\n: 3f800000\n"],
)
def test_malformed_caches_are_rejected(text):
    with pytest.raises(ArtifactError):
        parse_calibration_cache(text, "bad.cache")


def test_unknown_method_is_a_usage_error():
    with pytest.raises(UsageError):
        calibration_cache_text({"x": 1.0}, "mse")
