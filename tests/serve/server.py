"""Start ``memexport serve`` in a subprocess on 127.0.0.1 (a free port), wait until ready, stop it by PID."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")
GRPC_LISTENING = re.compile(r"gRPC listening on ([\d.]+:\d+)")


class Server:
    """A running server process; ``url`` is ``host:port`` (tritonclient's form), ``base`` the http URL,
    ``grpc_url`` the gRPC ``host:port`` when started with ``--grpc-port`` (else ``None``)."""

    def __init__(self, artifact: Path, *args: str, token: Optional[str] = None, ready_timeout: float = 120.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MEMEXPORT_SERVE_TOKEN", None)
        if token is not None:
            env["MEMEXPORT_SERVE_TOKEN"] = token
        port_args = () if "--port" in args else ("--port", "0")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "memexport", "serve", "-m", str(artifact), *port_args, *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_listening(args, ready_timeout)
        self.base = f"http://{self.url}"
        self.token = token
        self.wait_ready(ready_timeout)
        # printed before the HTTP line (the gRPC server starts in the app's lifespan)
        self.grpc_url = next((m.group(1) for m in map(GRPC_LISTENING.search, list(self.lines)) if m), None)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if LISTENING.search(line):
                self._listening.set()

    def _wait_listening(self, args: tuple[str, ...], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "\n".join(self.lines[-20:]))
        match = next(LISTENING.search(line) for line in self.lines if LISTENING.search(line))
        return f"{match.group(1)}:{match.group(2)}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("server exited:\n" + "\n".join(self.lines[-20:]))
            try:
                if self.get("/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server never became ready:\n" + "\n".join(self.lines[-20:]))

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request: (status, lower-cased headers, body), errors included (no exception for 4xx/5xx)."""
        headers = dict(headers or {})
        if self.token is not None and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()

    def raw(self, head: bytes, body: bytes = b"", timeout: float = 30) -> "RawAnswer":
        """Send ``head`` (request line and headers, up to the blank line) and ``body`` as bytes on a new connection,
        then read one answer: for requests no HTTP client library would send. ``Authorization`` is not added."""
        host, port = self.url.split(":")
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(head + body)
            return RawAnswer.read(sock)

    def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kwargs)

    def json(self, method: str, path: str, payload: Any = None, **kwargs: Any) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, _, data = self.request(method, path, body, **kwargs)
        return status, json.loads(data)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait, and SIGKILL only if it hangs; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def image_tensor(client: Any, blobs: list[bytes]) -> Any:
    """The ``image`` input (BYTES ``[N, 1]``) holding ``blobs``, for ``client``: ``tritonclient.http`` (as binary
    data) or ``tritonclient.grpc`` (raw contents, its only layout)."""
    import numpy as np

    data = np.array(blobs, dtype=object).reshape(len(blobs), 1)
    tensor = client.InferInput("image", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data, **({"binary_data": True} if client.__name__.endswith(".http") else {}))
    return tensor


def image_request(blobs: list[bytes], shape: list | None = None) -> tuple[bytes, str]:
    """A binary V2 ``image`` request body (JSON header, then Triton's BYTES layout) and its header's length, as the
    ``Inference-Header-Content-Length`` value; ``shape`` declares another one than ``[len(blobs), 1]``."""
    binary = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": shape or [len(blobs), 1],
                                     "parameters": {"binary_data_size": len(binary)}}]}).encode()
    return header + binary, str(len(header))


def check_example_client(url: str, model: str, photos: list[Path], expected: Any, tmp_path: Path, *args: str) -> None:
    """``examples/v2_client.py`` (with ``args``, e.g. ``--protocol grpc``) prints ``expected`` for ``photos``,
    exactly; with an undecodable file after a good one it prints nothing and one error line naming its row."""
    import numpy as np

    script = ROOT / "examples" / "v2_client.py"
    run = subprocess.run([sys.executable, str(script), *args, "--url", url, "--model", model, *map(str, photos)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = [line.rsplit(",", 1) for line in run.stdout.splitlines()]
    assert [path for path, _ in rows] == [str(p) for p in photos]
    np.testing.assert_array_equal(np.array([float(s) for _, s in rows], np.float32), expected)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    run = subprocess.run([sys.executable, str(script), *args, "--url", url, "--model", model, str(photos[0]), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == "" and len(run.stderr.splitlines()) == 1 and "row 1" in run.stderr


class RawAnswer:
    """One HTTP answer read from a socket: the status lines seen (an interim ``100 Continue`` included), the final
    status, its headers and body, and whether the server then closed the connection."""

    def __init__(self, lines: list[str], headers: dict[str, str], body: bytes, closed: bool) -> None:
        self.lines, self.headers, self.body, self.closed = lines, headers, body, closed
        self.status = int(lines[-1].split()[1])

    @classmethod
    def read(cls, sock: socket.socket) -> "RawAnswer":
        data, lines = b"", []
        while True:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed without an answer after {data!r}")
                data += chunk
            head, data = data.split(b"\r\n\r\n", 1)
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            lines.append(status_line)
            if not status_line.split()[1].startswith("1"):
                break
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
        length = int(headers.get("content-length", "0"))
        while len(data) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        closed = False
        if headers.get("connection", "").lower() == "close":  # said so: does it close the connection after answering?
            try:
                sock.settimeout(2)
                closed = sock.recv(1) == b""
            except ConnectionResetError:  # closed with our unread bytes in its buffer
                closed = True
            except socket.timeout:
                closed = False
        return cls(lines, headers, data[:length], closed)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    """An HTTP/1.1 request line and headers, ending with the blank line."""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1")


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body with one part per file, and its Content-Type."""
    boundary = "memexport-test-boundary-7d1f"
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def running(artifact: Path, *args: str, **kwargs: Any) -> Iterator[Server]:
    """A server for a ``with``-less fixture: yields it, then stops it by PID."""
    server = Server(artifact, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop()
