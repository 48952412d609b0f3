"""Shared pieces of the Ray tests: skip without Ray, find this test's scoring actors."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'memexport[ray]' (make test installs it)")

ACTOR_TITLE = b"ScoringActor"


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


def _descends_from_us(pid: int) -> bool:
    """Whether ``pid`` was started (through any chain) by this process: the local Ray instance a
    test starts runs its raylet, and so its workers, under the test process."""
    me = os.getpid()
    while pid > 1:
        pid = _parent(pid)
        if pid == me:
            return True
    return False


def scoring_actor_pids() -> set[int]:
    """PIDs of this test's live scoring actors (Ray titles its workers
    ``ray::MapWorker(MapBatches(ScoringActor))``). Only processes under this process count,
    so a test never touches another session's Ray workers on a shared machine."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    title = handle.read()
                if title.startswith(b"ray::") and ACTOR_TITLE in title and _descends_from_us(int(entry)):
                    pids.add(int(entry))
            except OSError:
                continue
    return pids
