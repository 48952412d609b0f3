"""A bounded load test of ``memexport serve`` on loopback: correctness under concurrency, then latency.

Starts the server itself (``memexport serve -m ARTIFACT --port 0``, stopped by PID at the end), then:

1. For each client count in ``--clients`` (default 1,8,32): that many threads, each sending
   ``--requests`` V2 ``infer`` requests of 1-4 images (seeded choice of ``--images``), as ``image``
   (the server decodes) or ``pixels`` (``--input pixels``), over REST or gRPC (``--protocol grpc``:
   ``tritonclient.grpc`` against ``--grpc-port``). Every request carries a unique ``id``; the run fails
   unless every request gets exactly one answer, with its own ``id``, and every score equals
   ``Predictor``'s on the same artifact (to ``--atol``). Reports the clients' own figures (p50/p99
   latency, images/s) beside the server's (the change of ``GET /v2/models/{m}/stats`` over the run:
   mean request, queue and compute times, and the batch sizes the batcher formed).
2. Overload (``--overload-clients``, default 32): a second server with ``--max-queue 2``; the run
   fails unless every answer is a 200 or a 503 (gRPC: ``OK`` or ``UNAVAILABLE``); reports the counts
   and the server's peak RSS.

    python tools/serve_load.py -m artifacts/resmem.onnx --images tests/data [--input pixels] [--protocol grpc] [--backend openvino --precision bf16] [--json out.json]

Prints one line per client count. Timing, not a test: quote it with the CPU's flags, on a quiet machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")
GRPC_LISTENING = re.compile(r"gRPC listening on ([\d.]+:\d+)")


def start_server(artifact: Path, extra: list[str]) -> tuple[subprocess.Popen, str, str | None]:
    """``memexport serve`` on free loopback ports; returns the process, the HTTP ``host:port`` once ready,
    and the gRPC ``host:port`` when ``extra`` asks for ``--grpc-port`` (printed before the HTTP line)."""
    process = subprocess.Popen([sys.executable, "-m", "memexport", "serve", "-m", str(artifact), "--port", "0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    grpc_url = None
    for line in process.stdout:
        grpc_match = GRPC_LISTENING.search(line)
        grpc_url = grpc_match.group(1) if grpc_match else grpc_url
        match = LISTENING.search(line)
        if match:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
            url = f"{match.group(1)}:{match.group(2)}"
            for _ in range(1200):
                if get(url, "/v2/health/ready")[0] == 200:
                    return process, url, grpc_url
                time.sleep(0.1)
            break
    process.terminate()
    raise SystemExit(f"error: the server did not become ready: {line.strip()}")


def get(url: str, path: str) -> tuple[int, bytes]:
    try:
        connection = http.client.HTTPConnection(url, timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""


def stop(process: subprocess.Popen) -> int:
    """SIGTERM (the server finishes what it accepted), then wait for the exit."""
    process.terminate()
    return process.wait(60)


def peak_rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else None


def infer_body(request_id: str, rows: list[Any], kind: str) -> tuple[bytes, dict[str, str]]:
    """A binary V2 request for ``rows`` (encoded images, or preprocessed arrays)."""
    if kind == "image":
        raw = b"".join(len(blob).to_bytes(4, "little") + blob for blob in rows)
        spec = {"name": "image", "shape": [len(rows), 1], "datatype": "BYTES"}
    else:
        batch = np.stack(rows).astype("<f4")
        raw = batch.tobytes()
        spec = {"name": "pixels", "shape": list(batch.shape), "datatype": "FP32"}
    spec["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"id": request_id, "inputs": [spec], "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def grpc_client(url: str, model: str, plan: list[tuple[str, list[int]]], rows: list[Any], kind: str, out: list) -> None:
    """:func:`client` over gRPC (``tritonclient.grpc``, raw contents); a gRPC status is recorded as its HTTP one."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from memexport.serve.grpc.codec import STATUS_CODES

    http_status = {f"StatusCode.{name}": status for status, name in STATUS_CODES.items()}
    connection = grpcclient.InferenceServerClient(url)
    for request_id, picks in plan:
        picked = [rows[i] for i in picks]
        data = np.array(picked, dtype=object).reshape(-1, 1) if kind == "image" else np.stack(picked).astype(np.float32)
        tensor = grpcclient.InferInput(kind, list(data.shape), "BYTES" if kind == "image" else "FP32")
        tensor.set_data_from_numpy(data)
        start = time.perf_counter()
        try:
            result = connection.infer(model, [tensor], request_id=request_id)
            answer: tuple[int, Any, Any] = (200, result.get_response().id, result.as_numpy("score").reshape(-1))
        except InferenceServerException as error:
            answer = (http_status.get(str(error.status()), 0), None, error.message())
        out.append((request_id, *answer, time.perf_counter() - start))
    connection.close()


def client(url: str, model: str, plan: list[tuple[str, list[int]]], rows: list[Any], kind: str, out: list) -> None:
    """Send each planned request on one keep-alive connection; record (id, status, answer id, scores, seconds)."""
    connection = http.client.HTTPConnection(url, timeout=120)
    for request_id, picks in plan:
        body, headers = infer_body(request_id, [rows[i] for i in picks], kind)
        start = time.perf_counter()
        try:
            connection.request("POST", f"/v2/models/{model}/infer", body, headers)
            response = connection.getresponse()
            data = response.read()
        except OSError as error:
            out.append((request_id, 0, None, str(error), time.perf_counter() - start))
            connection = http.client.HTTPConnection(url, timeout=120)
            continue
        seconds = time.perf_counter() - start
        answer_id, scores = None, None
        if response.status == 200:
            size = int(response.getheader("Inference-Header-Content-Length"))
            answer_id = json.loads(data[:size]).get("id")
            scores = np.frombuffer(data[size:], dtype="<f4")
        out.append((request_id, response.status, answer_id, scores, seconds))


def server_stats(url: str, model: str) -> dict[str, Any]:
    """The model's Triton statistics (``GET /v2/models/{model}/stats``), always read over REST."""
    status, body = get(url, f"/v2/models/{model}/stats")
    if status != 200:
        raise SystemExit(f"error: GET /v2/models/{model}/stats answered {status}: {body[:200]!r}")
    return json.loads(body)["model_stats"][0]


def stats_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server did between two statistics: mean ms per request and per batcher entry, and batches by size."""
    def duration(key: str) -> tuple[int, int]:
        b, a = before["inference_stats"][key], after["inference_stats"][key]
        return a["count"] - b["count"], a["ns"] - b["ns"]

    means = {}
    for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        count, ns = duration(key)
        means[key] = {"count": count, "mean_ms": ns / count / 1e6 if count else None}
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    batches = {b["batch_size"]: b["compute_infer"]["count"] - sizes.get(b["batch_size"], 0) for b in after["batch_stats"]}
    return {"images": after["inference_count"] - before["inference_count"], "executions": after["execution_count"] - before["execution_count"],
            "inference_stats": means, "batches_by_size": {size: n for size, n in sorted(batches.items()) if n}}


def run_level(url: str, model: str, clients: int, requests: int, rows: list[Any], expected: np.ndarray, kind: str,
              atol: float, seed: int, target: Any = client, target_url: str | None = None) -> dict[str, Any]:
    """One concurrency level (``target``: :func:`client` or :func:`grpc_client` at ``target_url``); raises
    SystemExit on any lost, duplicated or wrong answer."""
    rng = random.Random(seed)
    plans = [[(f"c{c}-r{r}", [rng.randrange(len(rows)) for _ in range(rng.randint(1, 4))]) for r in range(requests)] for c in range(clients)]
    outs: list[list] = [[] for _ in range(clients)]
    before = server_stats(url, model)
    start = time.perf_counter()
    threads = [threading.Thread(target=target, args=(target_url or url, model, plans[c], rows, kind, outs[c])) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    sent = {rid: picks for plan in plans for rid, picks in plan}
    answers = [record for out in outs for record in out]
    seen = Counter(record[0] for record in answers)
    problems = [f"{rid}: answered {seen[rid]} times" for rid in sent if seen[rid] != 1]
    for rid, status, answer_id, scores, _ in answers:
        if status != 200 or answer_id != rid:
            problems.append(f"{rid}: status {status}, answer id {answer_id!r}")
        elif len(scores) != len(sent[rid]) or np.abs(scores - expected[sent[rid]]).max() > atol:
            problems.append(f"{rid}: scores {scores.tolist()} differ from Predictor's {expected[sent[rid]].tolist()}")
    if problems:
        raise SystemExit(f"error: {len(problems)} bad answers at {clients} clients, e.g. {problems[0]}")
    latency = np.array([record[4] for record in answers]) * 1000
    images = sum(len(picks) for picks in sent.values())
    return {"clients": clients, "requests": len(answers), "images": images, "p50_ms": float(np.percentile(latency, 50)),
            "p99_ms": float(np.percentile(latency, 99)), "mean_ms": float(latency.mean()), "images_per_s": images / wall,
            "server": stats_change(before, server_stats(url, model))}


def overload(artifact: Path, model: str, clients: int, rows: list[Any], kind: str, extra: list[str], protocol: str) -> dict[str, Any]:
    """Many clients against ``--max-queue 2``: only 200s and 503s (gRPC: UNAVAILABLE) may come back."""
    process, url, grpc_url = start_server(artifact, [*extra, "--max-queue", "2"])
    target, target_url = (grpc_client, grpc_url) if protocol == "grpc" else (client, url)
    try:
        outs: list[list] = [[] for _ in range(clients)]
        plan = [[(f"o{c}-r{r}", [r % len(rows)]) for r in range(10)] for c in range(clients)]
        threads = [threading.Thread(target=target, args=(target_url, model, plan[c], rows, kind, outs[c])) for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = Counter(record[1] for out in outs for record in out)
        alive = get(url, "/v2/health/ready")[0] == 200
        rss = peak_rss_mb(process.pid)
    finally:
        stop(process)
    if set(statuses) - {200, 503} or not alive:
        raise SystemExit(f"error: overload answered {dict(statuses)} (only 200 and 503 allowed), server alive: {alive}")
    return {"clients": clients, "statuses": {str(k): v for k, v in sorted(statuses.items())}, "peak_rss_mb": rss}


def describe(protocol: str, level: dict[str, Any]) -> str:
    """One line: the clients' figures, then the server's own (its statistics' change over the level)."""
    server, ms = level["server"], {key: value["mean_ms"] for key, value in level["server"]["inference_stats"].items()}

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return (f"{level['clients']:>3} clients ({protocol}): {level['requests']} requests, {level['images']} images, p50 {level['p50_ms']:.1f} ms, "
            f"p99 {level['p99_ms']:.1f} ms, {level['images_per_s']:.1f} images/s | server /stats: request {fmt(ms['success'])} ms "
            f"(client mean {level['mean_ms']:.1f}); per batcher entry: queue {fmt(ms['queue'])} ms, compute input {fmt(ms['compute_input'])} "
            f"+ infer {fmt(ms['compute_infer'])} + output {fmt(ms['compute_output'])} ms; {server['executions']} batches by size {server['batches_by_size']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", type=Path, default=Path("artifacts/resmem.onnx"), help="artifact to serve")
    parser.add_argument("--images", type=Path, default=Path("tests/data"), help="folder of photos to send")
    parser.add_argument("--input", choices=("image", "pixels"), default="image", help="send encoded images or preprocessed pixels")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="V2 over REST (tritonclient's http layout) or gRPC (--grpc-port)")
    parser.add_argument("--decode", choices=("exact", "fast"), default="exact", help="the server's --decode (and the reference's)")
    parser.add_argument("--backend", help="the server's --backend (and the reference's)")
    parser.add_argument("--precision", help="the server's --precision (and the reference's)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=50, help="requests per client at each level")
    parser.add_argument("--overload-clients", type=int, default=32, help="clients in the overload run (0: skip it)")
    parser.add_argument("--atol", type=float, default=1e-6, help="largest score difference from Predictor allowed")
    parser.add_argument("--server-args", default="--device cpu", help="extra `memexport serve` options, e.g. '--max-batch-size 16'")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)

    from memexport.runtime.cpu import cpu_units
    from memexport.serve.options import ServeOptions
    from memexport.serve.service import load_predictor

    photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    same = [*(["--backend", args.backend] if args.backend else []), *(["--precision", args.precision] if args.precision else [])]
    extra = args.server_args.split() + ["--decode", args.decode, *same] + (["--grpc-port", "0"] if args.protocol == "grpc" else [])
    # The reference is built as the server builds its Predictor (same runner options, same decode), so
    # a fast-decoding server is checked against fast decoding, and OpenVINO's dynamic-shape graph against itself.
    predictor = load_predictor(args.model, ServeOptions(backend=args.backend, precision=args.precision, device="cpu", decode=args.decode))
    try:
        expected = predictor.score(photos)
        model = predictor.metadata.model
        rows = [p.read_bytes() for p in photos] if args.input == "image" else [predictor.preprocess(p) for p in photos]
    finally:
        predictor.close()
        predictor.runner.__exit__(None, None, None)  # entered by load_predictor
    units = cpu_units()
    report: dict[str, Any] = {"artifact": str(args.model), "input": args.input, "protocol": args.protocol, "server_args": extra,
                              "cpu": {"model": units.model, "flags": list(units.flags)}, "levels": []}
    print(f"cpu: {units.model} ({' '.join(units.flags) or 'no AMX/BF16/VNNI'}); timings on a shared machine are noisy")
    process, url, grpc_url = start_server(args.model, extra)
    target = (grpc_client, grpc_url) if args.protocol == "grpc" else (client, url)
    try:
        for level, clients in enumerate(int(c) for c in args.clients.split(",")):
            result = run_level(url, model, clients, args.requests, rows, expected, args.input, args.atol, level, *target)
            report["levels"].append(result)
            print(describe(args.protocol, result))
        report["peak_rss_mb"] = peak_rss_mb(process.pid)
    finally:
        stop(process)
    if args.overload_clients:
        report["overload"] = overload(args.model, model, args.overload_clients, rows, args.input, extra, args.protocol)
        print(f"overload ({args.overload_clients} clients, --max-queue 2): {report['overload']['statuses']}, peak RSS {report['overload']['peak_rss_mb']} MB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
