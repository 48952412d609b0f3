"""Score images on a KServe V2 server (``memexport serve`` or the Triton ensemble) with ``tritonclient.http``.

    python examples/v2_client.py --url 127.0.0.1:8000 --model resmem photo1.jpg photo2.png

All images go in ONE request as the input ``image`` (BYTES ``[N, 1]``, binary data); ``score`` comes
back as binary FP32. Prints ``path,score`` per image (``%.9g``: the float32 exactly) and exits 0; on
an error answer (a bad image, an unknown model, no server) prints one line on stderr and exits 1.
A server started with ``--token`` needs the token in ``MEMEXPORT_SERVE_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def score_images(url: str, model: str, paths: list[str]) -> np.ndarray:
    """One V2 ``infer`` call with every image's bytes; the scores, in order."""
    data = np.array([Path(path).read_bytes() for path in paths], dtype=object).reshape(len(paths), 1)
    image = httpclient.InferInput("image", list(data.shape), "BYTES")
    image.set_data_from_numpy(data, binary_data=True)
    token = os.environ.get("MEMEXPORT_SERVE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = httpclient.InferenceServerClient(url)
    try:
        result = client.infer(model, [image], outputs=[httpclient.InferRequestedOutput("score", binary_data=True)], headers=headers)
    finally:
        client.close()
    return result.as_numpy("score").reshape(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of the server (default 127.0.0.1:8000)")
    parser.add_argument("--model", default="resmem", help="model name (default resmem)")
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    try:
        scores = score_images(args.url, args.model, args.images)
    except InferenceServerException as error:
        print(f"error: {'; '.join(str(error.message()).splitlines())}", file=sys.stderr)
        return 1
    except OSError as error:  # an unreadable image, or no server at --url
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    for path, score in zip(args.images, scores):
        print(f"{path},{score:.9g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
