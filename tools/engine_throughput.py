"""Wall-clock images/s of ``predict --engine local`` vs ``--engine ray`` on one folder, in one run.

Each engine runs in its own process (as a user runs the command), one after the other:

* ``with start-up``: images / wall-clock of the whole process (Python, model load, Ray start,
  actor start), measured by this script around the child.
* ``steady``: the least-squares slope of images done against time over every progress report
  after the first, so process, Ray and model start-up are excluded (as is the head start of
  work already in flight when the first result arrives: it shifts the line, not its slope).
  Needs a few thousand images for many reports (Ray reports once per block of up to 128 rows).

    python tools/engine_throughput.py IMAGES -m artifacts/resmem.onnx [--batch-size 16] [--json out.json]

Prints one line per engine and the ray/local ratios. Timing, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memexport.runtime.cpu import cpu_units

CHILD = """
import json, sys, time
from pathlib import Path
from memexport.runtime.batch import PredictOptions
engine, model, images, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
marks = []
def progress(done, total):
    marks.append((time.perf_counter(), done))
options = PredictOptions(batch_size=batch, device="cpu", overwrite=True)
if engine == "ray":
    from memexport.distributed.ray import scores_from_images_on_ray as job
else:
    from memexport.runtime.batch import scores_csv_from_images as job
summary = job(Path(model), [Path(images)], Path(out), options, progress)
print(json.dumps({"scored": summary.scored, "failed": summary.failed, "marks": marks}))
"""


def run(engine: str, model: Path, images: Path, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", CHILD, engine, str(model), str(images), str(Path(folder) / "scores.csv"), str(batch_size)],
            capture_output=True, text=True, check=True,
        )
        wall = time.perf_counter() - started
    record = json.loads(result.stdout.strip().splitlines()[-1])
    images_done = record["scored"] + record["failed"]
    record.update(engine=engine, wall_s=wall, with_startup=images_done / wall, steady=steady_rate(record["marks"][1:]))
    return record


def steady_rate(marks: list[tuple[float, int]]) -> float:
    """Least-squares slope of done against time (images/s); 0 with fewer than 2 reports."""
    if len(marks) < 2:
        return 0.0
    times, done = [t for t, _ in marks], [d for _, d in marks]
    mean_t, mean_d = sum(times) / len(times), sum(done) / len(done)
    spread = sum((t - mean_t) ** 2 for t in times)
    return sum((t - mean_t) * (d - mean_d) for t, d in zip(times, done)) / spread if spread > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("-m", "--model", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cpu_flags = sorted(cpu_units().flags)
    records = [run(engine, args.model, args.images, args.batch_size) for engine in ("local", "ray")]
    for record in records:
        print(f"{record['engine']:6} {record['scored'] + record['failed']:>6} images  wall {record['wall_s']:7.1f} s  "
              f"with start-up {record['with_startup']:7.2f} img/s  steady {record['steady']:7.2f} img/s ({len(record['marks'])} reports)")
    local, ray = records
    print(f"ray/local: with start-up {ray['with_startup'] / local['with_startup']:.2f}x, steady {ray['steady'] / local['steady']:.2f}x  (cpu flags: {' '.join(cpu_flags) or 'none'})")
    if args.json:
        args.json.write_text(json.dumps({"records": records, "cpu_flags": cpu_flags}, indent=2))


if __name__ == "__main__":
    main()
