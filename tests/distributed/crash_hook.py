"""Test-only Ray worker setup hook: the scoring actor's process dies (``os._exit``) while decoding a file
whose name holds :data:`CRASH_MARK`, as a segfaulting decoder or the OOM killer would take it down.

Installed with ``ray.init(runtime_env={"worker_process_setup_hook": "tests.distributed.crash_hook.install"})``,
so memexport's own code carries no test hook."""

from __future__ import annotations

import os

CRASH_MARK = "crash-me"


def install() -> None:
    from memexport.runtime.multi import MultiPredictor

    original = MultiPredictor.preprocess

    def preprocess(self, image):  # type: ignore[no-untyped-def]
        if isinstance(image, (str, os.PathLike)) and CRASH_MARK in os.fspath(image):
            os._exit(77)  # no cleanup, no exception: the process is simply gone
        return original(self, image)

    MultiPredictor.preprocess = preprocess  # type: ignore[method-assign]
