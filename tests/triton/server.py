"""The real ``tritonserver`` from the nvidia-pytriton wheel in ``.triton-env`` (``make triton-env``), for tests.

The wheel bundles Triton 2.51 with the Python back end only. Running it outside PyTriton needs:
a backend folder holding ``libtriton_python.so`` and the stub built for the environment's Python;
``LD_LIBRARY_PATH`` naming the wheel's libraries and Python's LIBDIR (the stub links libpython);
and the environment's ``bin`` first on ``PATH``: the embedded interpreter finds its prefix, and so
its site-packages (numpy < 2, memexport), from the ``python3`` it finds there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = ROOT / ".triton-env"


@dataclass(frozen=True)
class TritonEnv:
    python: str  # "3.11"
    libdir: str
    site: Path

    @property
    def wheel(self) -> Path:
        return self.site / "pytriton" / "tritonserver"


def triton_env() -> tuple[TritonEnv | None, str]:
    """The environment, or ``None`` and the exact reason it cannot run a server."""
    missing = ENV / "pytriton-missing.txt"
    if missing.is_file():
        return None, missing.read_text().strip()
    if not (ENV / "bin" / "python").exists():
        return None, f"{ENV} does not exist; run `make triton-env`"
    code = "import json,sys,sysconfig as s;print(json.dumps([f'{sys.version_info[0]}.{sys.version_info[1]}',s.get_config_var('LIBDIR'),s.get_config_var('LDLIBRARY'),s.get_paths()['purelib']]))"
    version, libdir, library, site = json.loads(subprocess.run([str(ENV / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True).stdout)
    env = TritonEnv(version, libdir, Path(site))
    stub = env.wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not (env.wheel / "bin" / "tritonserver").is_file():
        return None, f"no tritonserver in {env.wheel}; run `make triton-env`"
    if not stub.is_file():
        return None, f"nvidia-pytriton has no Python back-end stub for Python {version}"
    if not (Path(libdir) / library).is_file() or not library.endswith(".so") and ".so." not in library:
        return None, f"Python {version} at {ENV} has no shared libpython ({library} in {libdir}); the stub needs one (build Python with --enable-shared)"
    return env, ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backends(env: TritonEnv, folder: Path) -> Path:
    """A backend folder with the Python back end and the stub for this Python."""
    python = folder / "backends" / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(env.wheel / "backends" / "python" / name, python / name)
    shutil.copy2(env.wheel / "python_backend_stubs" / env.python / "triton_python_backend_stub", python / "triton_python_backend_stub")
    return python.parent


class TritonServer:
    """``tritonserver`` on 127.0.0.1 with free ports, in its own process group, stopped by its PID."""

    def __init__(self, env: TritonEnv, repo: Path, work: Path) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log = work / "tritonserver.log"
        environ = dict(os.environ, PATH=f"{ENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                       LD_LIBRARY_PATH=os.pathsep.join([str(env.site / "nvidia_pytriton.libs"), env.libdir]))
        command = [str(env.wheel / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory", str(backends(env, work)),
                   "--http-address", "127.0.0.1", "--http-port", str(self.http_port), "--grpc-address", "127.0.0.1",
                   "--grpc-port", str(self.grpc_port), "--allow-metrics", "false", "--exit-timeout-secs", "5"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ, start_new_session=True)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_bytes().decode("utf-8", "replace").splitlines()
        return "\n".join(line for line in text if not line.startswith(("+", "|")))[-6000:] if text else "(empty log)"

    def stop(self) -> None:
        """SIGTERM to the server's process group (it and its Python stubs), SIGKILL after a bounded wait."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        try:  # a Python stub the server left behind (same process group)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
