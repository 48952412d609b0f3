"""Score images on a KServe V2 server (``memexport serve`` or the Triton ensemble) with ``tritonclient``.

    python examples/v2_client.py --url 127.0.0.1:8000 --model resmem photo1.jpg photo2.png
    python examples/v2_client.py --protocol grpc --url 127.0.0.1:8001 --model resmem photo1.jpg

All images go in ONE request as the input ``image`` (BYTES ``[N, 1]``, binary data over REST, raw
contents over gRPC); ``score`` comes back as binary FP32. Prints ``path,score`` per image (``%.9g``: the float32 exactly) and exits 0; on
an error answer (a bad image, an unknown model, no server) prints one line on stderr and exits 1.
A server started with ``--token`` needs the token in ``MEMEXPORT_SERVE_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tritonclient.utils import InferenceServerException


def score_images(url: str, model: str, paths: list[str], protocol: str = "http") -> np.ndarray:
    """One V2 ``infer`` call with every image's bytes, over ``http`` or ``grpc``; the scores, in order."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module  # gRPC sends tensors as raw contents: binary already
        binary: dict = {}
    else:
        import tritonclient.http as client_module
        binary = {"binary_data": True}
    data = np.array([Path(path).read_bytes() for path in paths], dtype=object).reshape(len(paths), 1)
    image = client_module.InferInput("image", list(data.shape), "BYTES")
    image.set_data_from_numpy(data, **binary)
    token = os.environ.get("MEMEXPORT_SERVE_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else None  # gRPC metadata keys are lower case
    client = client_module.InferenceServerClient(url)
    try:
        result = client.infer(model, [image], outputs=[client_module.InferRequestedOutput("score", **binary)], headers=headers)
    finally:
        client.close()
    return result.as_numpy("score").reshape(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of the server (default 127.0.0.1:8000)")
    parser.add_argument("--model", default="resmem", help="model name (default resmem)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="V2 over REST (default) or gRPC")
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    try:
        scores = score_images(args.url, args.model, args.images, args.protocol)
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
