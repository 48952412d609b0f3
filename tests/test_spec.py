"""Model specs: constants, JSON round trip, and coverage of every declared model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from memexport.core.errors import UsageError
from memexport.core.spec import MODELS, RESMEM, PreprocessSpec, get_spec

TESTS = Path(__file__).parent


def declared_coverage() -> set[tuple[str, str]]:
    """Every ``@pytest.mark.covers(model, kind)`` found in the test sources."""
    found = set()
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "covers"
                and len(node.args) == 2
                and all(isinstance(a, ast.Constant) for a in node.args)
            ):
                found.add((node.args[0].value, node.args[1].value))
    return found


def required_coverage() -> set[tuple[str, str]]:
    required = set()
    for name, spec in MODELS.items():
        required.add((name, "export"))
        required.update((name, f"parity:{precision}") for precision in spec.tolerances)
    return required


def test_every_declared_model_has_export_and_parity_tests():
    missing = sorted(required_coverage() - declared_coverage())
    assert not missing, f"declared models lack tests (add @pytest.mark.covers): {missing}"


def test_coverage_scan_sees_a_missing_model(monkeypatch):
    # The scan must be able to fail: a freshly declared model has no tests.
    from memexport.core.spec import ModelSpec

    monkeypatch.setitem(MODELS, "ghost", ModelSpec(name="ghost", builder="x:y", tolerances=RESMEM.tolerances))
    assert ("ghost", "export") in required_coverage() - declared_coverage()


def test_resmem_spec_matches_published_model():
    assert RESMEM.input_shape == (3, 227, 227)
    assert RESMEM.preprocess.resize == (256, 256) and RESMEM.preprocess.crop == 227
    assert RESMEM.preprocess.mean is None and RESMEM.preprocess.std is None
    assert RESMEM.parameters == 131_688_809
    assert RESMEM.opset == 17
    assert set(RESMEM.tolerances) == {"fp32", "fp16", "bf16", "int8"}


def test_preprocess_spec_json_round_trip():
    spec = PreprocessSpec(mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_json(RESMEM.preprocess.to_json()) == RESMEM.preprocess


def test_unknown_model_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model 'nope'.*resmem"):
        get_spec("nope")


def test_missing_tolerance_names_what_exists():
    with pytest.raises(UsageError, match="no tolerance for precision 'int4'"):
        RESMEM.tolerance("int4")
