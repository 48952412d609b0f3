"""The statistics recorder and Triton's message and JSON forms, without a server: the recorder's arithmetic
(per entry, per batch size, per request), its thread safety, the ``Batcher`` feeding it, and the REST JSON
(64-bit integers as numbers, zeros present) parsing back into the very message gRPC sends."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2", reason="tritonclient[grpc] is not installed (serve extra)")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import json_format  # noqa: E402

from memexport.serve.batching import Batcher  # noqa: E402
from memexport.serve.protos import triton_json  # noqa: E402
from memexport.serve.stats import Statistics, Timing, model_statistics  # noqa: E402


def test_execution_counts_entries_batches_and_images():
    stats = Statistics()
    stats.execution(5, [100, 300], Timing(10, 1000, 20))  # two entries (2 + 3 images) in one batch of 5
    stats.execution(1, [50], Timing(7, 400, 3))
    stats.execution(5, [0], Timing(1, 1, 1))
    stats.request(True, 2000)
    stats.request(False, 70)
    now = stats.snapshot()
    assert (now.inference_count, now.execution_count) == (11, 3)
    assert (now.queue.count, now.queue.ns) == (4, 450)
    # each entry is charged its batch's compute, as Triton charges each request of a batch
    assert (now.compute_infer.count, now.compute_infer.ns) == (4, 2 * 1000 + 400 + 1)
    assert (now.compute_input.ns, now.compute_output.ns) == (2 * 10 + 7 + 1, 2 * 20 + 3 + 1)
    assert {size: (infer.count, infer.ns) for size, (_, infer, _) in now.batches.items()} == {5: (2, 1001), 1: (1, 400)}
    assert (now.success.count, now.success.ns, now.fail.count, now.fail.ns) == (1, 2000, 1, 70)
    assert now.last_inference_ms > 1_600_000_000_000


def test_recorder_is_thread_safe():
    stats = Statistics()

    def hammer() -> None:
        for _ in range(2000):
            stats.execution(2, [1], Timing(1, 1, 1))
            stats.request(True, 1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    now = stats.snapshot()
    assert (now.execution_count, now.inference_count, now.success.count, now.batches[2][1].count) == (8000, 16000, 8000, 8000)


def test_message_and_rest_json_are_one_source():
    stats = Statistics()
    stats.execution(3, [5_000_000_000], Timing(1, 2, 3))  # past 2**32: a 64-bit count must survive as a number
    stats.request(True, 6_000_000_000)
    message = model_statistics(service_pb2, "resmem", "1", stats.snapshot())
    rest = triton_json(service_pb2.ModelStatisticsResponse(model_stats=[message]))
    entry = rest["model_stats"][0]
    assert entry["inference_stats"]["queue"] == {"count": 1, "ns": 5_000_000_000}
    assert entry["inference_stats"]["fail"] == {"count": 0, "ns": 0}  # zeros are present, as Triton writes them
    assert entry["batch_stats"] == [{"batch_size": 3, "compute_input": {"count": 1, "ns": 1},
                                     "compute_infer": {"count": 1, "ns": 2}, "compute_output": {"count": 1, "ns": 3}}]
    assert (entry["name"], entry["version"], entry["inference_count"]) == ("resmem", "1", 3)
    assert json_format.ParseDict(rest, service_pb2.ModelStatisticsResponse()).model_stats[0] == message


def test_config_json_writes_dims_as_numbers():
    config = model_config_pb2.ModelConfig(name="m", max_batch_size=4)
    config.input.add(name="pixels", data_type=model_config_pb2.TYPE_FP32, dims=[3, 227, 227])
    config.parameters["decode"].string_value = "exact"
    data = triton_json(config)
    assert data["input"][0]["dims"] == [3, 227, 227] and data["input"][0]["data_type"] == "TYPE_FP32"
    assert data["parameters"] == {"decode": {"string_value": "exact"}}
    assert json_format.ParseDict(data, model_config_pb2.ModelConfig()) == config


def test_batcher_feeds_the_recorder():
    stats = Statistics()
    sizes: list[int] = []

    async def run() -> list[np.ndarray]:
        batcher = Batcher(lambda batch: batch[:, 0] * 2, max_batch=4, max_delay_s=0.05, on_batch=sizes.append, stats=stats)
        batcher.start()
        try:  # 6 rows: split into 4 + 2, joined with the 1-row request into batches of at most 4
            return await asyncio.gather(batcher.submit(np.ones((6, 1), np.float32)), batcher.submit(np.full((1, 1), 3, np.float32)))
        finally:
            await batcher.stop()

    six, one = asyncio.run(run())
    assert six.tolist() == [2.0] * 6 and one.tolist() == [6.0]
    now = stats.snapshot()
    assert now.inference_count == 7 == sum(sizes) and now.execution_count == len(sizes) == sum(b[1].count for b in now.batches.values())
    assert max(now.batches) <= 4 and now.queue.count == 3  # three entries: two parts and the small request
    assert now.compute_infer.ns > 0 and now.queue.ns > 0
