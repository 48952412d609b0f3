"""memexport.core.optional: one message, exit code 2, for every missing optional dependency."""

from __future__ import annotations

import sys

import pytest

from memexport.core.errors import BackendUnavailableError
from memexport.core.optional import optional, require


def test_require_returns_the_module():
    import json

    assert require("json", "export") is json


def test_missing_module_is_one_line_with_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackendUnavailableError) as caught:
        require("openvino", "openvino", "the OpenVINO runner")
    assert str(caught.value) == "the OpenVINO runner needs openvino, which is not installed; install it with pip install 'memexport[openvino]'"
    assert caught.value.exit_code == 2


def test_hint_replaces_the_install_clause_and_is_computed_only_on_failure(monkeypatch):
    calls = []
    require("json", "x", hint=lambda: calls.append(1) or "never")
    assert calls == []
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"^building an engine needs tensorrt, which is not installed; use 8\.6$"):
        require("tensorrt", "tensorrt", "building an engine", lambda: "use 8.6")


def test_a_broken_install_is_named_as_broken(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg_memexport.py").write_text("import not_a_module_anywhere_memexport\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="brokenpkg_memexport, which fails to import .*not_a_module_anywhere_memexport"):
        require("brokenpkg_memexport", "export", "a test")


def test_optional_is_none_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert optional("ray") is None
    assert optional("json") is not None


def test_import_and_serve_help_need_neither_grpc_nor_tritonclient():
    """gRPC, tritonclient and protobuf (the serve extra's protocol half) are imported only where needed."""
    import subprocess

    script = (
        "import sys\n"
        "for name in ('grpc', 'tritonclient', 'google.protobuf'): sys.modules[name] = None\n"
        "import memexport, memexport.cli, memexport.serve.app, memexport.serve.runner, memexport.serve.grpc.server\n"
        "sys.argv = ['memexport', 'serve', '--help']\n"
        "try:\n    memexport.cli.main()\nexcept SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--grpc-port" in out.stdout
