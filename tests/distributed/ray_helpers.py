"""Shared pieces of the Ray tests: skip without Ray, find scoring actors."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'memexport[ray]' (make test installs it)")

ACTOR_TITLE = b"ScoringActor"


def scoring_actor_pids() -> set[int]:
    """PIDs of live processes running a memexport scoring actor (Ray titles its workers
    ``ray::MapWorker(MapBatches(ScoringActor))``)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    title = handle.read()
            except OSError:
                continue
            if title.startswith(b"ray::") and ACTOR_TITLE in title:
                pids.add(int(entry))
    return pids
