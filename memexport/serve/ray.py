"""``memexport serve --engine ray``: the same app under Ray Serve, batched by ``@serve.batch``.

Each replica loads every artifact once (integrity first) and serves :func:`memexport.serve.app.build_app`
through ``@serve.ingress``, so answers are byte for byte those of the plain server. Every image of a
request is one call to its model's own ``@serve.batch`` function, so batches form across requests, per
model, in images, up to ``--max-batch-size`` or ``--max-delay-ms``. Each replica admits ``--max-queue`` requests as the plain
server does (past it, 503 with ``Retry-After``); Ray Serve's own queue is bounded too
(``max_queued_requests``), as a backstop: past it, Ray answers 503 itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from memexport.core.errors import UsageError
from memexport.core.optional import require
from memexport.runtime.names import ModelArg, name_artifacts
from memexport.serve.options import TOKEN_ENV, ServeOptions, check_host, resolve_token
from memexport.serve.service import ServedModel, Service
from memexport.serve.stats import run_timed

_SERVICE: Optional[Service] = None  # the replica's service: one per replica process


def current_service() -> Service:
    """The service of this replica (the app's routes and middleware ask for it per request)."""
    assert _SERVICE is not None, "the replica has not started"
    return _SERVICE


@dataclass(frozen=True)
class RayServeOptions:
    """Where and how many replicas run.

    Attributes:
        address: Ray cluster address (default ``None``: a local instance sized to this machine).
        replicas: Fixed replica count (default 1), unless ``autoscale`` is set.
        autoscale: ``(min, max)`` replicas, scaled on ongoing requests (default ``None``).
        cpus_per_replica: Ray CPUs each replica reserves (default 1).
    """

    address: Optional[str] = None
    replicas: int = 1
    autoscale: Optional[tuple[int, int]] = None
    cpus_per_replica: float = 1.0

    @classmethod
    def parse(cls, address: Optional[str], replicas: int, autoscale: Optional[str]) -> "RayServeOptions":
        """From the CLI's ``--ray-address``, ``--replicas`` (0: default) and ``--autoscale MIN:MAX``."""
        if replicas and autoscale:
            raise UsageError("give --replicas N or --autoscale MIN:MAX, not both")
        if replicas < 0:
            raise UsageError(f"--replicas must be >= 1, got {replicas}")
        if autoscale is None:
            return cls(address, replicas or 1)
        try:
            low, high = (int(part) for part in autoscale.split(":"))
        except ValueError:
            raise UsageError(f"--autoscale expects MIN:MAX such as 1:4, got {autoscale!r}") from None
        if not 0 <= low <= high or high < 1:
            raise UsageError(f"--autoscale expects 0 <= MIN <= MAX and MAX >= 1, got {autoscale!r}")
        return cls(address, 1, (low, high))

    def deployment_options(self, options: ServeOptions) -> dict[str, Any]:
        scale: dict[str, Any] = (
            {"autoscaling_config": {"min_replicas": self.autoscale[0], "max_replicas": self.autoscale[1],
                                    "target_ongoing_requests": max(1, options.max_batch_size // 2)}}
            if self.autoscale else {"num_replicas": self.replicas}
        )
        # Twice --max-queue may reach a replica, so the app's own admission (503 with Retry-After, counted
        # in /metrics) refuses the excess; Ray's queue (503 without Retry-After) is only a backstop.
        return {**scale, "max_ongoing_requests": 2 * options.max_queue, "max_queued_requests": options.max_queue,
                "ray_actor_options": {"num_cpus": self.cpus_per_replica}}


def deployment(models: Sequence[ModelArg], options: ServeOptions, ray_options: RayServeOptions) -> Any:
    """The bound Ray Serve application: one ``MemexportServer`` deployment per ``ray_options``, every replica
    serving every model (named in the replica by :func:`memexport.runtime.names.name_artifacts`)."""
    serve = require("ray.serve", "ray", "memexport serve --engine ray")
    from memexport.serve.app import build_app

    @serve.deployment(name="memexport", **ray_options.deployment_options(options))
    @serve.ingress(build_app(current_service))
    class MemexportServer:
        def __init__(self, models: Sequence[ModelArg], options: ServeOptions) -> None:
            import memexport.serve.ray as here

            service = Service(name_artifacts(models), options)
            service.load()
            for model in service.models.values():
                model.activate(batched_infer(model, service, options))
            service.loaded = True
            here._SERVICE = self.service = service

    return MemexportServer.bind([ModelArg(Path(arg.path).resolve(), arg.name) for arg in models], options)


def batched_infer(model: ServedModel, service: Service, options: ServeOptions) -> Callable[[np.ndarray], Any]:
    """``model``'s inference function in a replica: each image one call to its own ``@serve.batch`` function,
    so batches form across requests, per model, on one inference thread per model."""
    serve = require("ray.serve", "ray", "memexport serve --engine ray")
    executor = ThreadPoolExecutor(1, thread_name_prefix=f"memexport-infer-{model.name}")

    @serve.batch(max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.max_delay_ms / 1000)
    async def score_rows(items: list[tuple[np.ndarray, int]]) -> list[float]:
        """Each item is one image and when it was queued (each image is one entry of the model's statistics)."""
        service.metrics.batch_size.observe(len(items))
        scores, timing, started = await run_timed(executor, model.predictor.infer, [row[None] for row, _ in items])
        model.stats.execution(len(items), [started - queued for _, queued in items], timing)
        return scores.tolist()

    async def infer(batch: np.ndarray) -> np.ndarray:
        queued = time.perf_counter_ns()
        return np.asarray(await asyncio.gather(*(score_rows((row, queued)) for row in batch)), dtype=np.float32)

    return infer


def serve_on_ray(models: Sequence[ModelArg], options: ServeOptions, host: str, port: int, insecure: bool, ray_options: RayServeOptions,
                 on_listen: Callable[[str], None] = print) -> None:
    """Run the app on Ray Serve until SIGTERM or Ctrl-C, then shut Serve down (replicas drain first)."""
    check_host(host, options.token, insecure)
    ray = require("ray", "ray", "memexport serve --engine ray")
    serve = require("ray.serve", "ray", "memexport serve --engine ray")
    init: dict[str, Any] = {"address": ray_options.address} if ray_options.address else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    ray.init(log_to_driver=False, **init)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(models, options, ray_options), name="memexport", route_prefix="/")
        on_listen(f"memexport serve: Ray Serve listening on http://{host}:{port} (ready)")
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()
        ray.shutdown()


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve application builder, for ``serve run`` and KubeRay's ``RayService``.

    ``import_path: memexport.serve.ray:app_builder`` with ``args`` as :func:`builder_options` reads them.

    Raises:
        UsageError: One line for a missing ``model``, an unknown or ill-typed argument, or a server open
            beyond this machine without a token.
    """
    models, options, ray_options = builder_options(args)
    return deployment(models, options, ray_options)


def builder_options(args: Mapping[str, Any]) -> tuple[list[ModelArg], ServeOptions, RayServeOptions]:
    """``app_builder``'s arguments read as ``memexport serve`` reads its options, with the same access rules.

    ``model`` is the artifact's path on the nodes, ``NAME=PATH``, or a list of them (named as ``serve -m``
    names them); ``replicas`` or ``autoscale`` (``MIN:MAX``); any :class:`ServeOptions` field by name
    (``max_batch_size: 16``...), converted to the field's type (YAML's ``"4"`` is the integer 4; a value
    of the wrong type is refused). The token comes from ``MEMEXPORT_SERVE_TOKEN``. The builder cannot see
    where Ray Serve's proxy listens, so it takes ``host`` (default ``0.0.0.0``: beyond this machine) and
    ``insecure`` as ``serve --host``/``--insecure`` do: beyond loopback, a token is required.

    Raises:
        UsageError: As :func:`app_builder`.
    """
    args = dict(args)
    if not args.get("model"):
        raise UsageError("app_builder needs args.model: the artifact's path on the Ray nodes (or a list of them)")
    given = args.pop("model")
    models = [ModelArg.parse(str(text)) for text in (given if isinstance(given, (list, tuple)) else [given])]
    host = str(args.pop("host", "0.0.0.0"))
    insecure = typed("insecure", bool, args.pop("insecure", False))
    ray_options = RayServeOptions.parse(None, typed("replicas", int, args.pop("replicas", 0)), args.pop("autoscale", None))
    hints = typing.get_type_hints(ServeOptions)
    fields = [field.name for field in dataclasses.fields(ServeOptions) if field.name != "token"]
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise UsageError(f"unknown serve option(s) {', '.join(unknown)}; choose from model, replicas, autoscale, host, insecure, {', '.join(fields)}")
    options = ServeOptions(**{name: typed(name, hints[name], value) for name, value in args.items()}, token=resolve_token(None))
    try:
        check_host(host, options.token, insecure)
    except UsageError:
        raise UsageError(f"app_builder: Ray Serve listens on {host} (args.host), beyond this machine, and no token is set; set "
                         f"{TOKEN_ENV} on every node, or args.insecure: true, or args.host: 127.0.0.1 if Serve listens on loopback") from None
    return models, options, ray_options


def typed(name: str, kind: Any, value: Any) -> Any:
    """A YAML or ``key=value`` argument as ``kind`` (``int``, ``float``, ``bool``, ``str``, or ``Optional`` of one).

    Raises:
        UsageError: One line naming the argument, the type wanted and the value given.
    """
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    base = next(arg for arg in typing.get_args(kind) if arg is not type(None)) if optional else kind
    if optional and (value is None or str(value).strip().lower() in ("", "none", "null")):
        return None
    converted = _convert(base, value)
    if converted is None:
        want = {bool: "true or false", int: "an integer", float: "a number"}.get(base, "a string")
        raise UsageError(f"app_builder: args.{name} must be {want}{' or null' if optional else ''}, got {value!r}")
    return converted


_FLAGS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _convert(base: Any, value: Any) -> Any:
    """``value`` as ``base``, or ``None`` when it is not one (a bool is no number, 4.5 no integer)."""
    if isinstance(value, bool):
        return value if base is bool else None
    text = str(value).strip()
    if base is bool:
        return _FLAGS.get(text.lower())
    if base is int and isinstance(value, float):
        return int(value) if value.is_integer() else None
    if base in (int, float):
        try:
            return base(text)
        except ValueError:
            return None
    return text
