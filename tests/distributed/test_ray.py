"""``memexport.distributed.ray`` on a local Ray instance with 2 CPUs: same results as the local
engine, hostile files as error rows, a killed actor, an interrupted run resumed, Parquet output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.distributed.ray_helpers import ray, scoring_actor_pids
from memexport.distributed.ray import Pool, RayOptions, ScoringActor, pool_for, scores_dataset, scores_from_images_on_ray
from memexport.core.errors import Interrupted, UsageError
from memexport.runtime.batch import PredictOptions, errors_path_for, scores_csv_from_images
from tests.scoring import expected_tiny, rows, write_copies
from tests.runtime.hostile_images import BAD_REASONS, GOOD_MODES, NON_UTF8_NAME, write_bad_inputs, write_good_modes, write_non_utf8

CPU = {"device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance with 2 CPUs for the module (start-up costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture()
def copies(tmp_path, data_dir) -> Path:
    """240 distinct files holding one real photo: decoding takes long enough to act mid-run."""
    return write_copies(tmp_path / "many", data_dir / "china.jpg", 240)


def as_dict(path: Path) -> dict[str, str]:
    return {row[0]: row[2] for row in rows(path)[1:]}


def errors_of(path: Path) -> dict[str, str]:
    """An errors CSV (``path,error``) as ``{path: error}``."""
    return {row[0]: row[1] for row in rows(path)[1:]}


def test_pool_sizes_leave_room_for_reads_and_fit_the_nodes():
    assert pool_for([2.0], 0, "m.onnx", RayOptions()) == Pool(1, 1.0, 0.0)  # 1 CPU left for read tasks
    assert pool_for([2.0], 0, "m.onnx", RayOptions(reserve_cpus=0)) == Pool(1, 2.0, 0.0)  # paths only: no reads
    assert pool_for([1.0, 1.0], 0, "m.onnx", RayOptions(reserve_cpus=0)) == Pool(2, 1.0, 0.0)
    assert pool_for([16.0, 16.0, 8.0], 0, "m.onnx", RayOptions()) == Pool(7, 4.0, 0.0)  # 3 + 3 + 1
    assert pool_for([8.0], 4, "m.plan", RayOptions()) == Pool(4, 1.0, 1.0)  # TensorRT: one GPU each
    assert pool_for([8.0], 2, "m.onnx", RayOptions(device="cuda", actors=1)) == Pool(1, 1.0, 1.0)
    assert pool_for([8.0], 0, "m.onnx", RayOptions(actors=3, cpus_per_actor=2)).threads == 2
    with pytest.raises(UsageError, match="GPU"):
        pool_for([8.0], 0, "m.engine", RayOptions())
    with pytest.raises(UsageError, match=">= 0"):
        pool_for([8.0], 0, "m.onnx", RayOptions(actors=-1))


def test_actor_sizes_onnx_runtime_to_its_cpus(tiny):
    actor = ScoringActor(str(tiny), RayOptions(device="cpu"), threads=2)
    session = actor.runners["tiny-scorer"].session.get_session_options()
    assert (session.intra_op_num_threads, session.inter_op_num_threads) == (2, 1)
    assert actor.decoders._max_workers == 2


def hostile_folder(tmp_path: Path, data_dir: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("china.jpg", "flower.jpg", "brick.png"):
        (folder / name).write_bytes((data_dir / name).read_bytes())
    write_bad_inputs(folder, data_dir, tmp_path / "outside")
    write_good_modes(folder)
    write_non_utf8(folder, data_dir)
    return folder


def test_same_rows_and_errors_as_the_local_engine_on_hostile_files(tiny, tmp_path, data_dir):
    folder = hostile_folder(tmp_path, data_dir)
    options = PredictOptions(batch_size=4, **CPU)
    local = scores_csv_from_images(tiny, [folder], tmp_path / "local.csv", options)
    remote = scores_from_images_on_ray(tiny, [folder], tmp_path / "ray.csv", options)
    expected_names = {"china.jpg", "flower.jpg", "brick.png", *GOOD_MODES, os.fsdecode(NON_UTF8_NAME)}
    scores = as_dict(tmp_path / "ray.csv")
    assert {Path(p).name for p in scores} == expected_names
    local_scores = as_dict(tmp_path / "local.csv")
    assert set(scores) == set(local_scores)  # the same paths, as given
    for path, text in scores.items():  # batches group differently: the last float bits may differ
        assert float(text) == pytest.approx(float(local_scores[path]), abs=1e-6)
        assert float(text) == pytest.approx(expected_tiny(Path(path)), abs=1e-5)  # float32 ReduceMean vs float64
    local_rows, ray_rows = rows(tmp_path / "local.csv"), rows(tmp_path / "ray.csv")
    assert ray_rows[0] == local_rows[0] == ["path", "model", "score", "backend", "precision", "decode"]
    # Same columns, row for row (rows arrive in block order on Ray): the run is named on each.
    assert sorted((r[0], r[1], *r[3:]) for r in ray_rows[1:]) == sorted((r[0], r[1], *r[3:]) for r in local_rows[1:])
    assert {tuple(r[3:]) for r in ray_rows[1:]} == {("onnxruntime", "fp32", "exact")}
    errors = errors_of(errors_path_for(tmp_path / "ray.csv"))
    assert errors == errors_of(errors_path_for(tmp_path / "local.csv"))
    assert {Path(p).name: text.split(":")[0] for p, text in errors.items()} == BAD_REASONS
    assert (remote.scored, remote.failures, remote.total) == (local.scored, local.failures, local.total)
    assert (remote.backend, remote.precision) == (local.backend, local.precision) == ("onnxruntime", "fp32")


def test_resumes_a_local_engine_csv_and_refuses_one_of_another_precision(tiny, tmp_path, data_dir):
    from typer.testing import CliRunner

    from memexport.cli import app

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("china.jpg", "flower.jpg", "brick.png"):
        (folder / name).write_bytes((data_dir / name).read_bytes())
    out = tmp_path / "scores.csv"
    scores_csv_from_images(tiny, [folder / "china.jpg"], out, PredictOptions(**CPU))
    resumed = scores_from_images_on_ray(tiny, [folder], out, PredictOptions(resume=True, **CPU))
    assert (resumed.skipped, resumed.scored, resumed.backend, resumed.precision) == (1, 2, "onnxruntime", "fp32")
    table = rows(out)
    assert table[0] == ["path", "model", "score", "backend", "precision", "decode"] and len(table) == 4  # one header, no repeats
    assert {Path(r[0]).name for r in table[1:]} == {"china.jpg", "flower.jpg", "brick.png"}
    assert {tuple(r[3:]) for r in table[1:]} == {("onnxruntime", "fp32", "exact")}
    for row in table[1:]:
        assert float(row[2]) == pytest.approx(expected_tiny(Path(row[0])), abs=1e-5)

    # The same file as an OpenVINO BF16 run writes it: Ray must not append FP32 scores to it.
    (folder / "cat.jpg").write_bytes((data_dir / "china.jpg").read_bytes()[:500])  # a failure, to see the errors file kept
    other = out.read_text().replace(",onnxruntime,fp32", ",openvino,bf16")
    out.write_text(other)
    errors = errors_path_for(out)
    errors.write_text("path,error\nold,kept\n")
    args = ["predict", str(folder), "-m", str(tiny), "-o", str(out), "--device", "cpu", "--engine", "ray", "--resume"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "openvino bf16" in lines[0] and "onnxruntime fp32" in lines[0] and "--overwrite" in lines[0]
    assert out.read_text() == other and errors.read_text() == "path,error\nold,kept\n"  # nothing written


def test_dataset_of_bytes_gives_error_rows_and_model_columns(tiny, tmp_path, data_dir):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "china.jpg").write_bytes((data_dir / "china.jpg").read_bytes())
    write_good_modes(folder)
    jpeg = (data_dir / "flower.jpg").read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "text.jpg").write_text("not an image\n")
    from tests.runtime.hostile_images import png_declaring

    (folder / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    files = ray.data.read_binary_files(str(folder), include_paths=True)
    table = scores_dataset(files, tiny, RayOptions(batch_size=4, device="cpu")).to_pandas()
    assert set(table.columns) == {"path", "score", "error", "model", "backend", "precision", "decode", "node"}
    by_name = {Path(p).name: row for p, row in zip(table["path"], table.itertuples())}
    assert set(by_name) == {"china.jpg", *GOOD_MODES, "zero.jpg", "truncated.jpg", "text.jpg", "bomb.png"}
    reasons = {name: row.error.split(":")[0] for name, row in by_name.items() if isinstance(row.error, str)}
    assert reasons == {"zero.jpg": "empty", "truncated.jpg": "truncated", "text.jpg": "not-an-image", "bomb.png": "too-large"}
    for name in ("china.jpg", *GOOD_MODES):
        assert by_name[name].score == pytest.approx(expected_tiny(folder / name), abs=1e-6)
    assert np.isnan(by_name["zero.jpg"].score)
    assert set(table["model"]) == {"tiny-scorer"} and set(table["precision"]) == {"fp32"} and set(table["backend"]) == {"onnxruntime"}


def test_killed_actor_is_replaced_and_every_image_is_written_once(tiny, copies, tmp_path):
    out = tmp_path / "scores.csv"
    killed: list[int] = []
    after_kill: list[int] = []

    def progress(done: int, total: int) -> None:
        if not killed:
            pids = scoring_actor_pids()
            assert pids, "no scoring actor process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)
            after_kill.append(done)
        else:
            after_kill.append(done)

    summary = scores_from_images_on_ray(tiny, [copies], out, PredictOptions(batch_size=8, **CPU), progress)
    assert killed and after_kill[0] < 240 and after_kill[-1] == 240, "the kill did not land mid-run"
    names = [Path(row[0]).name for row in rows(out)[1:]]
    assert len(names) == len(set(names)) == 240 and summary.scored == 240 and summary.failed == 0
    assert not set(killed) & scoring_actor_pids()  # the killed process is gone; Ray restarted the actor


def test_interrupted_run_resumes_and_scores_each_image_exactly_once(tiny, copies, tmp_path):
    out = tmp_path / "scores.csv"

    def ctrl_c(done: int, total: int) -> None:
        raise KeyboardInterrupt  # as Ctrl-C lands in the driver's loop

    with pytest.raises(Interrupted, match="--resume") as caught:
        scores_from_images_on_ray(tiny, [copies], out, PredictOptions(batch_size=8, **CPU), ctrl_c)
    first = caught.value.summary.scored
    assert 0 < first == len(rows(out)) - 1 < 240
    resumed = scores_from_images_on_ray(tiny, [copies], out, PredictOptions(batch_size=8, resume=True, **CPU))
    assert (resumed.skipped, resumed.scored) == (first, 240 - first)
    names = [Path(row[0]).name for row in rows(out)[1:]]
    assert sorted(names) == sorted(p.name for p in copies.iterdir()) and len(set(names)) == 240
    expected = expected_tiny(next(copies.iterdir()))
    assert all(float(row[2]) == pytest.approx(expected, abs=1e-6) for row in rows(out)[1:])


def test_parquet_output_resumes_without_rescoring(tiny, copies, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "scores.parquet"
    (copies / "empty.jpg").write_bytes(b"")

    def stop_after_first(done: int, total: int) -> None:
        raise KeyboardInterrupt

    options = PredictOptions(batch_size=8, **CPU)
    with pytest.raises(Interrupted):
        scores_from_images_on_ray(tiny, [copies], out, options, stop_after_first, output_format="parquet")
    with pytest.raises(UsageError, match="--resume"):
        scores_from_images_on_ray(tiny, [copies], out, options, output_format="parquet")
    resumed = scores_from_images_on_ray(tiny, [copies], out, PredictOptions(batch_size=8, resume=True, **CPU), output_format="parquet")
    table = pq.read_table(out)  # the folder of parts reads as one table
    names = [Path(p).name for p in table.column("path").to_pylist()]
    assert len(names) == len(set(names)) == 240 and resumed.skipped + resumed.scored == 240
    assert set(table.column("model").to_pylist()) == {"tiny-scorer"}
    assert set(zip(table.column("backend").to_pylist(), table.column("precision").to_pylist())) == {("onnxruntime", "fp32")}
    assert [row[1].split(":")[0] for row in rows(errors_path_for(out))[1:]] == ["empty"]
    part = sorted(out.glob("part-*.parquet"))[0]  # as if an OpenVINO BF16 run had written it
    pq.write_table(pq.read_table(part).drop_columns(["backend", "precision"]).append_column("backend", [["openvino"] * len(pq.read_table(part))])
                   .append_column("precision", [["bf16"] * len(pq.read_table(part))]), part)
    (copies / "new.jpg").write_bytes((copies / names[0]).read_bytes())
    with pytest.raises(UsageError, match="openvino bf16.*onnxruntime fp32"):
        scores_from_images_on_ray(tiny, [copies], out, PredictOptions(batch_size=8, resume=True, **CPU), output_format="parquet")


def test_two_models_decode_once_in_each_actor_and_resume_per_model(tmp_path, data_dir):
    from tests.models import write_tiny_scorer

    pair = [write_tiny_scorer(tmp_path / "a.onnx", model="model-a"), write_tiny_scorer(tmp_path / "v.onnx", model="model-v", crop=224)]
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("china.jpg", "flower.jpg", "brick.png"):
        (folder / name).write_bytes((data_dir / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    options = PredictOptions(batch_size=2, decode="fast", **CPU)
    scores_csv_from_images(pair, [folder], tmp_path / "local.csv", options)
    out = tmp_path / "ray.csv"
    scores_csv_from_images(pair[0], [folder / "china.jpg"], out, options)  # model-a already scored one photo
    kept = rows(out)[1]
    summary = scores_from_images_on_ray(pair, [folder], out, replace(options, resume=True, pipeline="phases"))
    assert (summary.skipped, summary.scored, summary.failed, list(summary.runs)) == (0, 3, 1, ["model-a", "model-v"])
    local, remote = rows(tmp_path / "local.csv")[1:], rows(out)[1:]
    assert remote[0] == kept and len(remote) == len(local) == 6  # one row per image and model, none twice
    expected = {(r[0], r[1]): float(r[2]) for r in local}
    assert {(r[0], r[1]) for r in remote} == set(expected)
    assert max(abs(float(r[2]) - expected[(r[0], r[1])]) for r in remote) <= 1e-6
    assert [Path(r[0]).name for r in rows(errors_path_for(out))[1:]] == ["broken.jpg"]  # once, not once per model


def test_cli_refuses_ray_options_on_the_local_engine(tiny, tmp_path):
    from typer.testing import CliRunner

    from memexport.cli import app

    result = CliRunner().invoke(app, ["predict", str(tmp_path), "-m", str(tiny), "-o", str(tmp_path / "s.csv"), "--actors", "2"])
    assert result.exit_code == 2 and "--engine ray" in result.output
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "-m", str(tiny), "-o", str(tmp_path / "s.csv"), "--engine", "spark"])
    assert result.exit_code == 2 and "local or ray" in result.output


@pytest.mark.slow
def test_same_scores_as_the_local_engine_with_resmem(resmem_onnx, data_dir, tmp_path):
    options = PredictOptions(batch_size=4, **CPU)
    scores_csv_from_images(resmem_onnx, [data_dir], tmp_path / "local.csv", options)
    scores_from_images_on_ray(resmem_onnx, [data_dir], tmp_path / "ray.csv", options)
    local, remote = as_dict(tmp_path / "local.csv"), as_dict(tmp_path / "ray.csv")
    assert set(local) == set(remote) and len(local) == 8
    assert max(abs(float(local[p]) - float(remote[p])) for p in local) <= 1e-6


@pytest.mark.slow
def test_killed_driver_then_resume_from_the_command_line(tiny, copies, tmp_path):
    ray.shutdown()  # the CLI starts its own local instance, as a user's would
    try:
        out = tmp_path / "scores.csv"
        args = [sys.executable, "-m", "memexport", "predict", str(copies), "-m", str(tiny), "-o", str(out), "--device", "cpu", "--batch-size", "1", "--engine", "ray"]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        kept = len(rows(out)) - 1
        assert 1 <= kept < 240
        result = subprocess.run([*args, "--resume"], capture_output=True, timeout=600)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert f"{kept} images were already scored".encode() in result.stdout
        names = [Path(row[0]).name for row in rows(out)[1:]]
        assert len(names) == len(set(names)) == 240
    finally:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2)


def test_precision_reaches_the_actors(tiny, tmp_path, data_dir):
    """`predict --engine ray --backend openvino --precision bf16` computes BF16 in the actors and says so on every row."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from memexport.runtime.openvino_runner import bf16_refusal
    from memexport.runtime.cpu import cpu_units
    import openvino as ov

    why = bf16_refusal(cpu_units(), ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if why is not None:
        pytest.skip(f"no BF16 here: {why}")
    out = tmp_path / "bf16.csv"
    summary = scores_from_images_on_ray(tiny, [data_dir], out, PredictOptions(backend="openvino", precision="bf16", **CPU))
    table = rows(out)
    assert summary.scored == len(table) - 1 > 0 and (summary.backend, summary.precision) == ("openvino", "bf16")
    assert {tuple(r[3:]) for r in table[1:]} == {("openvino", "bf16", "exact")}
    for row in table[1:]:
        assert float(row[2]) == pytest.approx(expected_tiny(Path(row[0])), abs=1e-2)


def test_decode_mode_reaches_the_actors(tiny, tmp_path, data_dir):
    """`predict --engine ray --decode fast` decodes fast in the actors, as the local engine does, and says so on every row."""
    from tests.runtime.test_decode import camera_jpeg

    folder = tmp_path / "camera"
    folder.mkdir()
    for name in ("china.jpg", "flower.jpg"):
        camera_jpeg(folder / name, data_dir / name)
    options = PredictOptions(decode="fast", **CPU)
    summary = scores_from_images_on_ray(tiny, [folder], tmp_path / "ray.csv", options)
    scores_csv_from_images(tiny, [folder], tmp_path / "local.csv", options)
    assert summary.decode == "fast" and summary.scored == 2
    ray_rows, local_rows = sorted(rows(tmp_path / "ray.csv")[1:]), sorted(rows(tmp_path / "local.csv")[1:])
    assert [(r[0], r[1], *r[3:]) for r in ray_rows] == [(r[0], r[1], *r[3:]) for r in local_rows]
    assert {tuple(r[3:]) for r in ray_rows} == {("onnxruntime", "fp32", "fast")}
    assert [float(r[2]) for r in ray_rows] == pytest.approx([float(r[2]) for r in local_rows], abs=1e-6)
