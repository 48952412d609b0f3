"""Measure the fast-decode rule: per oversampling factor, decode cost and score fidelity against exact.

Usage:
    python tools/decode_rule.py MODEL FOLDER [--oversample 1,2,4] [--limit 0]

For each factor k, ``--decode fast`` keeps at least k times the model's resize on each side (JPEGs
DCT-scaled with ``Image.draft``, others box-reduced), then resizes with :mod:`memexport.runtime.resample`. Prints, per k: milliseconds of one core per
image (decode + preprocess, one thread's CPU time, the median over the folder), the speed-up over exact
decoding, and ONNX Runtime FP32's scores against exact decoding's (Spearman, Kendall, mean and max
abs) with the model spec's decode tolerance verdict. The k that memexport uses is
``memexport.core.spec.FAST_DECODE_OVERSAMPLE``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from memexport.core.parity import compare
from memexport.core.spec import get_spec
from memexport.runtime import preprocess as pre
from memexport.runtime.files import collect_images
from memexport.runtime.registry import runner_for


def inputs(paths: list[Path], spec, oversample: int | None) -> tuple[np.ndarray, float]:
    """The model inputs with exact decoding (``None``) or fast decoding at ``oversample``, and the median ms per image."""
    arrays, times = [], []
    for path in paths:
        started = time.thread_time()  # CPU time of this thread: what one core spends, robust to a loaded machine
        if oversample is None:
            arrays.append(pre.preprocess(path, spec))
        else:
            image = pre.load_image(path, draft=spec.fast_decode_size(oversample))
            arrays.append(pre.preprocess_image(image, spec, decode="fast", oversample=oversample))
        times.append((time.thread_time() - started) * 1000.0)
    return np.stack(arrays), float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--oversample", default="1,2,4")
    parser.add_argument("--limit", type=int, default=0, help="Use the first N images only (0: all).")
    args = parser.parse_args()
    paths = collect_images([args.folder]).paths
    paths = paths[: args.limit] if args.limit else paths
    with runner_for(args.model) as runner:
        spec = runner.metadata.preprocess
        tolerance = get_spec(runner.metadata.model).decode_tolerance

        def scores(batch: np.ndarray) -> np.ndarray:
            return np.concatenate([runner.infer(batch[i : i + 16]) for i in range(0, len(batch), 16)])

        exact, exact_ms = inputs(paths, spec, None)
        reference = scores(exact)
        print(f"{len(paths)} images in {args.folder}; exact decoding {exact_ms:.1f} ms/image (one core); tolerance: {tolerance.describe()}")
        print(f"{'oversample':>10} {'ms/img':>8} {'speed-up':>8} {'spearman':>9} {'kendall':>8} {'mean abs':>9} {'max abs':>8}  verdict")
        for k in (int(part) for part in args.oversample.split(",")):
            batch, ms = inputs(paths, spec, k)
            report = compare(scores(batch), reference, tolerance)
            print(f"{k:>10} {ms:>8.1f} {exact_ms / ms:>7.1f}x {report.spearman:>9.4f} {report.kendall:>8.4f} {report.mean_abs:>9.4f} "
                  f"{report.max_abs:>8.4f}  {'PASS' if report.passed else 'FAIL'}")


if __name__ == "__main__":
    main()
