"""bench across back ends and precisions: which paths run, what records carry, and the fastest faithful path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memexport.bench import BenchOptions, bench_artifacts, bench_paths, fastest_keeping_ranking
from memexport.core.errors import UsageError
from memexport.runtime.cpu import cpu_units
from memexport.core.spec import DEFAULT_TOLERANCES, MODELS, ModelSpec
from tests.conftest import needs_openvino
from tests.models import write_tiny_scorer


def test_every_applicable_combination_and_only_those():
    notes: list[str] = []
    paths = bench_paths(["a.onnx", "b.xml"], ["onnxruntime", "openvino"], ["fp32", "bf16"], notes.append)
    assert [(p.name, b, q) for p, b, q in paths] == [
        ("a.onnx", "onnxruntime", "fp32"), ("a.onnx", "openvino", "fp32"), ("a.onnx", "openvino", "bf16"),
        ("b.xml", "openvino", "fp32"), ("b.xml", "openvino", "bf16"),
    ]
    assert notes == ["a.onnx on onnxruntime: no --precision bf16 there (it computes the artifact's own precision)"]
    # A back end offering none of the precisions runs once, at the artifact's own.
    assert [(b, q) for _, b, q in bench_paths(["a.onnx"], ["onnxruntime", "openvino"], ["bf16"])] == [("onnxruntime", None), ("openvino", "bf16")]
    assert [(p.name, b, q) for p, b, q in bench_paths(["a.onnx", "e.plan"])] == [("a.onnx", "onnxruntime", None), ("e.plan", "tensorrt", None)]
    with pytest.raises(UsageError, match=r"e\.plan: none of the back ends asked for \(onnxruntime, openvino\) reads \.plan files"):
        bench_paths(["e.plan"], ["onnxruntime", "openvino"])
    with pytest.raises(UsageError, match="unknown back end 'ov'"):
        bench_paths(["a.onnx"], ["ov"])


@needs_openvino
def test_records_carry_backend_precision_cpu_and_fidelity(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(MODELS, "tiny-scorer", ModelSpec(name="tiny-scorer", builder="x:y", tolerances=DEFAULT_TOLERANCES))
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    notes: list[str] = []
    options = BenchOptions(batch_sizes=(2,), iterations=2, warmup=0, torch_baseline=False, backends=("onnxruntime", "openvino"),
                           precisions=("fp32", "bf16"), fidelity=data_dir)
    records = bench_artifacts([model], options, notes.append)
    expected = [("onnxruntime", "fp32"), ("openvino", "fp32")] + ([("openvino", "bf16")] if cpu_units().bf16 else [])
    assert [(r.backend, r.precision) for r in records] == expected
    for record in records:
        assert record.batch_size == 2 and record.images_per_s > 0 and record.cpu_units == cpu_units().flags and record.cpu
        assert record.fidelity_images == 8 and record.keeps_ranking
    ort, ov32 = records[0], records[1]
    assert (ort.spearman, ort.mean_abs) == (1.0, 0.0) and ov32.max_abs <= 1e-5
    assert fastest_keeping_ranking(records) is max(records, key=lambda r: r.images_per_s)
    if not cpu_units().bf16:
        assert any("skipped" in n and "no BF16 unit" in n for n in notes)


@needs_openvino
def test_cli_prints_the_cpu_the_ratio_and_the_fastest_faithful_path(tmp_path, data_dir):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    out = tmp_path / "bench.json"
    args = ["bench", "-m", str(model), "--backend", "onnxruntime", "--backend", "openvino", "--batch-sizes", "2",
            "--iterations", "2", "--warmup", "0", "--no-torch", "--fidelity", str(data_dir), "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "memexport", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"cpu: {cpu_units().label()}")
    assert "x onnxruntime fp32" in result.stdout and "spearman" in result.stdout
    # The tiny scorer's model name has no spec: statistics without a verdict, so no path is named.
    assert "fidelity without a verdict" in result.stdout
    records = json.loads(out.read_text())
    assert [(r["backend"], r["precision"]) for r in records] == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    assert all(r["cpu_units"] == list(cpu_units().flags) and r["spearman"] == 1.0 for r in records)


def test_rounds_time_every_path_in_turn_with_all_loaded(tmp_path, data_dir, monkeypatch):
    """--rounds: warm-up once, then each round times every path; the records pool every round's calls."""
    import memexport.bench as bench

    monkeypatch.setitem(MODELS, "tiny-scorer", ModelSpec(name="tiny-scorer", builder="x:y", tolerances=DEFAULT_TOLERANCES))
    first, second = write_tiny_scorer(tmp_path / "a.onnx"), write_tiny_scorer(tmp_path / "b.onnx")
    calls: list[tuple[str, int, bool]] = []
    real_infer = bench.Runner.infer

    def spy(self, batch):
        calls.append((self.path.name, len(batch), all(r._active for r in live)))
        return real_infer(self, batch)

    live: list = []
    real_open = bench._open_path

    def opening(*args, **kwargs):
        opened = real_open(*args, **kwargs)
        live.append(opened.runner)
        return opened

    monkeypatch.setattr(bench.Runner, "infer", spy)
    monkeypatch.setattr(bench, "_open_path", opening)
    options = BenchOptions(batch_sizes=(2,), iterations=3, warmup=1, torch_baseline=False, rounds=3, fidelity=data_dir)
    records = bench_artifacts([first, second], options)
    timed = [(name, size) for name, size, _ in calls if size == 2]
    # warm-up + 1 call per round, a then b, three rounds (fidelity scoring comes after, in batches of 8).
    assert timed == [("a.onnx", 2), ("a.onnx", 2), ("b.onnx", 2), ("b.onnx", 2), ("a.onnx", 2), ("b.onnx", 2), ("a.onnx", 2), ("b.onnx", 2)]
    assert all(both_loaded for _, size, both_loaded in calls if size == 2)
    assert [(r.artifact, r.iterations) for r in records] == [(str(first), 3), (str(second), 3)]
    assert all(r.spearman == 1.0 for r in records)
    with pytest.raises(UsageError, match="--rounds must be at least 1, got 0"):
        BenchOptions(rounds=0)


def test_bf16_adds_the_torch_autocast_peer_with_its_fidelity(tmp_path, data_dir, monkeypatch):
    """--precision bf16 times torch under BF16 autocast too (a BF16 CPU only), scored against ONNX Runtime FP32."""
    pytest.importorskip("torch")
    import memexport.bench as bench
    import memexport.export.torch_runner as torch_runner
    from memexport.export.weights import WeightsSource
    from tests.export.test_torch_runner import tiny_torch_scorer

    monkeypatch.setitem(MODELS, "tiny-scorer", ModelSpec(name="tiny-scorer", builder="x:y", tolerances=DEFAULT_TOLERANCES))
    spec = MODELS["tiny-scorer"]
    monkeypatch.setattr(torch_runner, "reference_runner_for", lambda meta, device="cpu": torch_runner.TorchRunner(spec, WeightsSource(None, {}, 0), device, model=tiny_torch_scorer()))
    monkeypatch.setattr(bench, "torch_available", lambda: True)
    notes: list[str] = []
    options = BenchOptions(batch_sizes=(2,), iterations=2, warmup=0, backends=("onnxruntime",), precisions=("bf16",), fidelity=data_dir)
    records = bench_artifacts([write_tiny_scorer(tmp_path / "tiny.onnx")], options, notes.append)
    if not cpu_units().bf16:
        assert [(r.backend, r.precision) for r in records] == [("onnxruntime", "fp32"), ("torch", "fp32")]
        assert any("skipped torch bf16 autocast" in n for n in notes)
        return
    assert [(r.backend, r.precision) for r in records] == [("onnxruntime", "fp32"), ("torch", "fp32"), ("torch", "bf16")]
    torch32, torch16 = records[1], records[2]
    assert torch32.spearman is None  # the model itself: nothing to compare
    assert torch16.fidelity_images == 8 and torch16.spearman is not None and torch16.mean_abs > 0  # another model than the ONNX: scored, not assumed
