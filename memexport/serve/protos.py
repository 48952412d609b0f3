"""The KServe/Triton protobuf messages ``memexport serve`` answers with, imported lazily, and their REST JSON form.

The generated modules are the ones ``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2``,
``service_pb2_grpc``, ``model_config_pb2``), from Triton's published ``grpc_service.proto`` and
``model_config.proto``; they and ``protobuf`` are in the ``serve`` extra. Statistics and model
configs are built once as messages; gRPC sends them as they are and REST sends :func:`triton_json`,
so the two protocols cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from memexport.core.optional import require

EXTRA = "serve"


def grpc(purpose: str) -> Any:
    """``grpc`` (grpcio, which ``tritonclient[grpc]`` brings)."""
    return require("grpc", EXTRA, purpose)


def service_pb2(purpose: str) -> Any:
    """``tritonclient.grpc.service_pb2`` (raises ``BackendUnavailableError`` naming the ``serve`` extra)."""
    return require("tritonclient.grpc.service_pb2", EXTRA, purpose)


def service_pb2_grpc(purpose: str) -> Any:
    """``tritonclient.grpc.service_pb2_grpc``: the ``GRPCInferenceService`` servicer base and registration."""
    return require("tritonclient.grpc.service_pb2_grpc", EXTRA, purpose)


def model_config_pb2(purpose: str) -> Any:
    """``tritonclient.grpc.model_config_pb2``: Triton's ``ModelConfig``."""
    return require("tritonclient.grpc.model_config_pb2", EXTRA, purpose)


def from_dict(data: dict[str, Any], message: Any) -> Any:
    """``message`` filled from a dict in the messages' JSON form (the REST answers', e.g. model metadata)."""
    return require("google.protobuf.json_format", EXTRA, "memexport serve").ParseDict(data, message)


def triton_json(message: Any) -> dict[str, Any]:
    """``message`` as Triton's REST API writes it: proto field names, every field (zeros too), enums by
    name, and 64-bit integers as JSON numbers (protobuf's JSON mapping would write them as strings)."""
    json_format = require("google.protobuf.json_format", EXTRA, "memexport serve")
    data = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, data)


_WIDE = frozenset({2, 4})  # FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64


def _numbers(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a message's dict) with every 64-bit integer field turned from a string back into an int."""
    for name, value in data.items():
        field = descriptor.fields_by_name[name]
        repeated = field.is_repeated
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            if entry.message_type is not None:
                data[name] = {key: _numbers(entry.message_type, item) for key, item in value.items()}
            elif entry.cpp_type in _WIDE:
                data[name] = {key: int(item) for key, item in value.items()}
        elif field.message_type is not None:
            data[name] = [_numbers(field.message_type, item) for item in value] if repeated else _numbers(field.message_type, value)
        elif field.cpp_type in _WIDE:
            data[name] = [int(item) for item in value] if repeated else int(value)
    return data
