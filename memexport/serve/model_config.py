"""A served model's Triton ``ModelConfig``: what ``GET /v2/models/{m}/config`` and gRPC ``ModelConfig`` answer.

Built with the Triton repository writer's own helpers (:mod:`memexport.triton.writer`, one schema: Triton's
``model_config.proto``) from what the server really does:

* ``name`` (the served name, e.g. ``resmem_int8``), ``platform`` (``memexport_<back end>``, as the model metadata says), ``backend: "memexport"``,
  ``default_model_filename`` (the artifact's file name);
* ``max_batch_size``: ``--max-batch-size``, the largest batch the batcher forms (a larger request is split);
* inputs ``image`` (``TYPE_STRING`` ``[1]``) and ``pixels`` (``TYPE_FP32``, the artifact's input shape), both
  ``optional`` because a request sends one of the two; output ``score`` (``TYPE_FP32`` ``[1]``);
* ``dynamic_batching``: ``--max-delay-ms`` as ``max_queue_delay_microseconds``; its queue policy holds the
  admission limit (``--max-queue`` as ``max_queue_size``) and ``--timeout`` (rejected past it);
* ``instance_group``: one instance (one inference thread) on the runner's device;
* ``parameters``: the precision computed, the decode mode, the artifact's model and what its score means
  (the model metadata's ``properties``, which gRPC's ``ModelMetadataResponse`` has no field for).
"""

from __future__ import annotations

from typing import Any

from memexport.serve import protos
from memexport.serve.service import ServedModel
from memexport.serve.v2 import IMAGE, PIXELS, SCORE
from memexport.triton.writer import add_instances, add_tensor, new_config, set_parameters

PURPOSE = "GET /v2/models/{model}/config"


def model_config(model: ServedModel) -> Any:
    """The ``ModelConfig`` of a served ``model`` (loaded: as :meth:`Service.check_model` returns it)."""
    pb = protos.model_config_pb2(PURPOSE)  # the serve extra's line, before the writer's own import
    options, meta, runner = model.options, model.predictor.metadata, model.predictor.runner
    config = new_config(model.name, options.max_batch_size, backend="memexport", platform=model.metadata()["platform"])
    config.default_model_filename = model.path.name
    add_tensor(config.input, IMAGE, "TYPE_STRING", [1])
    add_tensor(config.input, PIXELS, "TYPE_FP32", meta.input_shape)
    for tensor in config.input:
        tensor.optional = True
    add_tensor(config.output, SCORE, "TYPE_FP32", [1])
    batching = config.dynamic_batching
    batching.max_queue_delay_microseconds = round(options.max_delay_ms * 1000)
    batching.default_queue_policy.max_queue_size = options.max_queue
    batching.default_queue_policy.default_timeout_microseconds = round(options.timeout_s * 1e6)
    batching.default_queue_policy.timeout_action = pb.ModelQueuePolicy.REJECT
    add_instances(config, 1, "KIND_GPU" if str(runner.device).startswith("cuda") else "KIND_CPU")
    set_parameters(config, {"precision": runner.precision, "decode": options.decode, "model": meta.model, "output_meaning": model.meaning})
    return config
