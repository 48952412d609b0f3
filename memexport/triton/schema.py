"""Triton's ``ModelConfig`` (``tritonclient.grpc.model_config_pb2``) and protobuf's text format, imported lazily.

The writer builds every ``config.pbtxt`` as a ``ModelConfig`` message and the checker parses them into
the same message, so the two share one schema: Triton's own. Both modules are in the ``triton`` extra
(``tritonclient[grpc]`` and ``protobuf``); a missing one is one line naming the extra.
"""

from __future__ import annotations

from typing import Any

from memexport.core.optional import require

EXTRA = "triton"


def model_config_pb2(purpose: str) -> Any:
    """Triton's generated ``model_config_pb2`` module.

    Args:
        purpose: What needs it, for the error line (``"writing a Triton config.pbtxt"``).

    Raises:
        BackendUnavailableError: ``tritonclient[grpc]`` is not installed (``pip install 'memexport[triton]'``).
    """
    return require("tritonclient.grpc.model_config_pb2", EXTRA, purpose)


def text_format(purpose: str) -> Any:
    """``google.protobuf.text_format`` (raises like :func:`model_config_pb2`)."""
    return require("google.protobuf.text_format", EXTRA, purpose)


def render(config: Any) -> str:
    """A ``ModelConfig`` as ``config.pbtxt`` text: fields in the proto's order, lists of numbers on one line."""
    return text_format("writing a Triton config.pbtxt").MessageToString(config, as_utf8=True, use_short_repeated_primitives=True)


def parse(text: str, purpose: str) -> Any:
    """``config.pbtxt`` text parsed into a ``ModelConfig`` (raises ``text_format.ParseError`` on bad text)."""
    pb = model_config_pb2(purpose)
    return text_format(purpose).Parse(text, pb.ModelConfig())
