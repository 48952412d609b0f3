"""The torch reference runner: the declared model in eager torch, FP32 (or BF16 autocast, a peer to compare with)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memexport.core.errors import BackendUnavailableError, UsageError
from memexport.export.weights import WeightsSource
from memexport.runtime.metadata import ArtifactMetadata
from memexport.core.optional import require
from memexport.runtime.base import Runner, RunnerOptions, parse_device
from memexport.core.spec import ModelSpec


class TorchRunner(Runner):
    """Eager torch reference with the same ``infer`` contract as the artifact runners.

    Args:
        spec: The declared model.
        weights: Its checkpoint(s).
        device: ``"cpu"`` or ``"cuda"`` (default ``"cpu"``).
        model: An already built module to reuse instead of building one (default ``None``).
        autocast: ``"bf16"`` runs under ``torch.autocast(dtype=torch.bfloat16)``, what a torch user
            would try first for speed on a BF16 CPU; ``None`` is exact FP32 (default ``None``).
    """

    backend = "torch"

    def __init__(self, spec: ModelSpec, weights: WeightsSource, device: str = "cpu", model: Any = None, autocast: str | None = None) -> None:
        super().__init__(None, RunnerOptions(device=device))
        if autocast not in (None, "bf16"):
            raise UsageError(f"torch autocast {autocast!r} is not supported; use bf16, or none for FP32")
        self.spec, self.weights, self.model, self.autocast = spec, weights, model, autocast
        self._torch_device: str | None = None

    @property
    def precision(self) -> str:
        """``bf16`` under autocast, else ``fp32``."""
        return self.autocast or "fp32"

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:N``; ``auto`` resolves when active (CUDA when torch sees it)."""
        if self._torch_device is not None:
            return self._torch_device
        kind, index = parse_device(self.options.device)
        return "cpu" if kind == "cpu" else (f"cuda:{index}" if kind == "cuda" else kind)

    def memory_bytes(self) -> int | None:
        """Bytes of the module's parameters and buffers, once active."""
        if self.model is None or self._torch_device is None:
            return None
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def activate(self) -> None:
        torch = require("torch", "export", "the torch reference")
        kind, index = parse_device(self.options.device)
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        elif kind == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch sees no CUDA device; use --device cpu")
        device = "cpu" if kind == "cpu" else f"cuda:{index}"
        if self.model is None:
            from memexport.export.onnx_export import build_torch_model

            self.model = build_torch_model(self.spec, self.weights)
        self.model = self.model.to(device).eval()
        self._torch_device = device
        spec = self.spec
        self.metadata = ArtifactMetadata(
            model=spec.name, precision="fp32", input_name=spec.input_name, output_name=spec.output_name,
            input_shape=tuple(spec.input_shape), preprocess=spec.preprocess, opset=0,
            weights={"sha256": self.weights.sha256},
        )

    def deactivate(self) -> None:
        self._torch_device = None

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(kind, dtype=torch.bfloat16, enabled=self.autocast == "bf16"):
            out = self.model(torch.from_numpy(batch).to(self.device))
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out.float().cpu().numpy()


def reference_runner_for(metadata: ArtifactMetadata, weights_override: Any = None, device: str = "cpu") -> TorchRunner:
    """The torch reference for an artifact, with the weights it was exported from.

    Args:
        metadata: The artifact's metadata.
        weights_override: A checkpoint path to use instead of the recorded one (default ``None``).
        device: Torch device (default ``"cpu"``).

    Raises:
        UsageError: When the reference weights differ from those the artifact was exported from.
    """
    from pathlib import Path

    from memexport.export.weights import resolve, sha256_file
    from memexport.core.spec import get_spec

    spec = get_spec(metadata.model)
    recorded = metadata.weights or {}
    parts = {name: Path(part["path"]) for name, part in (recorded.get("parts") or {}).items()}
    if weights_override is not None:
        source = resolve(weights_override, parts, recorded.get("seed", 0), spec=spec)
    elif recorded.get("path") and Path(recorded["path"]).is_file():
        source = resolve(recorded["path"], parts, recorded.get("seed", 0), spec=spec)
    elif recorded.get("path") is None and "path" in recorded:
        source = WeightsSource(None, parts, recorded.get("seed", 0))
    else:
        source = resolve(None, parts, recorded.get("seed", 0), spec=spec)
    if recorded.get("sha256") and source.sha256 != recorded["sha256"]:
        raise UsageError(
            f"reference weights {source.path} (sha256 {str(source.sha256)[:12]}) differ from the weights this artifact was "
            f"exported from (sha256 {recorded['sha256'][:12]}); pass the original checkpoint with --weights"
        )
    for name, part in (recorded.get("parts") or {}).items():
        path = Path(part["path"])
        if not path.is_file():
            raise UsageError(f"the {name} checkpoint this artifact was exported from, {path}, is missing; restore it to rebuild the reference")
        if part.get("sha256") and sha256_file(path) != part["sha256"]:
            raise UsageError(
                f"the {name} checkpoint {path} changed since export (sha256 {sha256_file(path)[:12]} != {part['sha256'][:12]}); "
                "restore the original file to rebuild the reference"
            )
    return TorchRunner(spec, source, device=device)
