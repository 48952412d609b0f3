"""Score images on a V2 inference server: `memexport serve` or the Triton ensemble from `memexport triton-repo`.

    python examples/v2_client.py --url 127.0.0.1:8000 --model resmem IMAGE [IMAGE ...]

Sends every image in ONE request as input ``image`` (BYTES, shape [N, 1], binary data: the files'
own bytes, decoded by the server), asks for ``score`` as binary data and prints ``path,score`` per
image (``%.9g``: the float32 exactly). Exits 1 with one line when the server answers with an error
(for example ``row 1: not a recognised image ...`` for a bad file). Needs ``tritonclient[http]``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def score(url: str, model: str, paths: list[str]) -> np.ndarray:
    """One request with every image; the scores, one per image."""
    import tritonclient.http as httpclient

    rows = np.array([[open(path, "rb").read()] for path in paths], dtype=np.object_)
    image = httpclient.InferInput("image", list(rows.shape), "BYTES")
    image.set_data_from_numpy(rows, binary_data=True)
    with httpclient.InferenceServerClient(url) as client:
        result = client.infer(model, [image], outputs=[httpclient.InferRequestedOutput("score", binary_data=True)])
    return result.as_numpy("score").reshape(len(paths), -1)[:, 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of the server's HTTP endpoint")
    parser.add_argument("--model", default="resmem", help="model name (the artifact's model: resmem, m3m)")
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    from tritonclient.utils import InferenceServerException

    try:
        scores = score(args.url, args.model, args.images)
    except (InferenceServerException, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    for path, value in zip(args.images, scores):
        print(f"{path},{float(value):.9g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
