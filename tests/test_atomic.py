"""Artifacts appear whole or not at all: killed writers and full disks leave the final name untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memexport.core.atomic import atomic_path, stale_temporaries, write_bytes_atomic, write_text_atomic
from memexport.core.errors import MemexportError

SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from memexport.core.atomic import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, "wb") as handle:
            for i in range(200):
                handle.write(b"N" * 65536)
                handle.flush()
                if i == 20:
                    print("half", flush=True)
                time.sleep(0.05)
    """
)

FSIZE_WRITER = textwrap.dedent(
    """
    import resource, signal, sys
    from memexport.core.atomic import write_bytes_atomic
    from memexport.core.errors import MemexportError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so writes past the cap fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        write_bytes_atomic(sys.argv[1], b"N" * 1_000_000)
    except MemexportError as error:
        print(f"refused: {error}")
        sys.exit(3)
    """
)


def test_writes_rename_into_place_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_text_atomic(target, "{}")
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_text() == "{}" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600
    assert stale_temporaries(target) == []


def test_an_exception_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old complete artifact")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("exporter crashed")
    assert target.read_bytes() == b"old complete artifact"
    assert stale_temporaries(target) == []


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_mid_write_never_exposes_a_partial_file(tmp_path, existing):
    target = tmp_path / "engine.plan"
    if existing:
        target.write_bytes(b"previous engine")
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"half"
    leftovers = stale_temporaries(target)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # really mid-write
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    if existing:
        assert target.read_bytes() == b"previous engine"
    else:
        assert not target.exists()
    assert stale_temporaries(target) == leftovers  # the debris has a temporary name, never the final one


def test_file_size_cap_fails_cleanly(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"previous")
    result = subprocess.run([sys.executable, "-c", FSIZE_WRITER, str(target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "refused:" in result.stdout and "big.bin" in result.stdout and "File too large" in result.stdout
    assert "Traceback" not in result.stderr
    assert target.read_bytes() == b"previous" and stale_temporaries(target) == []


@pytest.fixture()
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); test_file_size_cap_fails_cleanly covers the full disk")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_fails_cleanly(tiny_tmpfs):
    target = tiny_tmpfs / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(MemexportError, match=r"model\.onnx: could not write \(No space left on device\)"):
        write_bytes_atomic(target, b"N" * 1_000_000)
    assert target.read_bytes() == b"old" and stale_temporaries(target) == []
    write_bytes_atomic(target, b"fits")  # the space was given back
    assert target.read_bytes() == b"fits"


def test_killed_export_leaves_no_artifact_under_the_final_name(tmp_path, resmem_weights):
    target = tmp_path / "resmem.onnx"
    target.write_bytes(b"previous export")
    process = subprocess.Popen(
        [sys.executable, "-m", "memexport", "export", "resmem", "-o", str(target), "--weights", str(resmem_weights)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    def writing() -> bool:
        sizes = []
        for leftover in stale_temporaries(target):
            try:
                sizes.append(leftover.stat().st_size)
            except FileNotFoundError:  # renamed or removed between listing and stat
                pass
        return any(size > 1_000_000 for size in sizes)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not writing():
        assert process.poll() is None, "export ended before it could be killed"
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert target.read_bytes() == b"previous export"
