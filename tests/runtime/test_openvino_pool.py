"""The OpenVINO runner's static-shape models: an evicted model is never pooled again, and
``memory_bytes()`` counts every compiled model still alive, however callers interleave."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from memexport.runtime.base import RunnerOptions
from memexport.runtime.registry import runner_for
from tests.conftest import needs_openvino
from tests.models import scorer_scores

CPU = RunnerOptions(device="cpu")


def preprocessed(paths) -> np.ndarray:
    from memexport.core.spec import RESMEM
    from memexport.runtime.preprocess import preprocess

    return np.stack([preprocess(p, RESMEM.preprocess) for p in paths])


class Alive:
    """Weak references to every model a runner compiles: how many are still in memory, independently of the runner's own count."""

    def __init__(self, runner) -> None:
        self.refs = [weakref.ref(compiled) for compiled in runner._static.values()]
        compile_ = runner._compile

        def tracked(*args, **kwargs):
            compiled = compile_(*args, **kwargs)
            self.refs.append(weakref.ref(compiled))
            return compiled

        runner._compile = tracked

    def count(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.refs)


def pooled_models_are_kept(runner) -> bool:
    """Every pooled request belongs to the model kept for its batch size (under the runner's lock)."""
    with runner._lock:
        return all(runner._static.get(key) is owner for key, (owner, _) in runner._requests.items())


@needs_openvino
def test_a_model_evicted_during_a_call_is_counted_then_freed_never_pooled(tiny, sample_images):
    batch = preprocessed(sample_images)
    with runner_for(tiny, CPU, "openvino") as runner:
        one = runner.memory_bytes()  # the batch-1 model compiled on activation
        alive = Alive(runner)
        inside: dict[str, int] = {}
        compiled_for = runner._compiled_for

        def another_caller_evicts_it(size, *args, **kwargs):
            compiled = compiled_for(size, *args, **kwargs)
            if size == 3 and not inside:
                inside["started"] = 1
                runner.infer(batch[:4])  # between this call finding its model and running it,
                runner.infer(batch[:5])  # other callers push batch size 3 out of the kept models
                inside["memory"], inside["alive"] = runner.memory_bytes(), alive.count()
            return compiled

        runner._compiled_for = another_caller_evicts_it
        np.testing.assert_allclose(runner.infer(batch[:3]), scorer_scores(batch[:3]), atol=1e-6)
        assert (inside["alive"], inside["memory"]) == (3, 3 * one)  # sizes 4 and 5 kept, size 3 still running
        assert sorted(runner._static) == [4, 5] and pooled_models_are_kept(runner)
        assert (alive.count(), runner.memory_bytes()) == (2, 2 * one)  # the evicted model is gone, not re-pooled


@needs_openvino
def test_batch_sizes_thrashed_from_several_threads_keep_the_pool_and_memory_true(tiny, sample_images):
    from memexport.runtime.openvino_runner import STATIC_SHAPES_KEPT

    batch = preprocessed(sample_images)
    expected = scorer_scores(batch)
    with runner_for(tiny, CPU, "openvino") as runner:
        one = runner.memory_bytes()
        alive = Alive(runner)
        stale: list[bool] = []
        running = threading.Event()
        running.set()

        def watch() -> None:  # samples the pool while the callers thrash it
            while running.is_set():
                stale.append(not pooled_models_are_kept(runner))

        def call(i: int) -> None:
            size = 1 + (i * 7) % 5  # sizes 1-5 in a scrambled order, more than the models kept
            np.testing.assert_allclose(runner.infer(batch[:size]), expected[:size], atol=1e-6)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(max_workers=6) as pool:
                list(pool.map(call, range(48)))
        finally:
            running.clear()
            watcher.join()
        assert stale and not any(stale), "an evicted model was pooled again"
        assert len(runner._static) == STATIC_SHAPES_KEPT and not runner._in_use
        assert alive.count() * one == runner.memory_bytes() == STATIC_SHAPES_KEPT * one
