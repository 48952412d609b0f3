"""The CUDA runtime calls memexport needs, without torch.

Two back ends give the same small interface (:class:`CudaApi`):

* cuda-python's runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` in
  cuda-python < 12.6), preferred when installed;
* ``ctypes`` on ``libcudart``, found next to TensorRT's or the system's CUDA libraries.

Only what the TensorRT runner, the VRAM budget and GPU discovery use is wrapped: device
count and properties, memory info, device and pinned host allocations, one stream and
asynchronous copies. Every call checks its status and raises :class:`CudaError` with
the CUDA error name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from memexport.core.errors import BackendUnavailableError, CudaError
from memexport.core.optional import optional

# The loader's names for libcudart, newest CUDA first: the device machines carry CUDA 13.
SONAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")
# Where NVIDIA's pip wheels put libcudart below site-packages/nvidia: CUDA 13 wheels use cu13/,
# CUDA 12 wheels cuda_runtime/.
WHEEL_FOLDERS = ("cu13", "cuda_runtime")
# cudaMemcpyKind values (stable across CUDA releases).
MEMCPY_HOST_TO_DEVICE = 1
MEMCPY_DEVICE_TO_HOST = 2
# cudaDeviceAttr values (stable across CUDA releases).
ATTR_COMPUTE_CAPABILITY_MAJOR = 75
ATTR_COMPUTE_CAPABILITY_MINOR = 76
# Status codes that mean "no usable GPU here" rather than a failure worth reporting.
NO_DEVICE_ERRORS = {35: "cudaErrorInsufficientDriver", 100: "cudaErrorNoDevice", 999: "cudaErrorUnknown"}
# cudaDeviceProp starts with `char name[256]` in every CUDA release; the rest of its layout
# changes between releases, so only the name is read from it and the rest comes from
# cudaDeviceGetAttribute / cudaMemGetInfo. The buffer is far larger than any release's struct.
_DEVICE_PROP_BUFFER = 16384


@dataclass(frozen=True)
class DeviceProperties:
    """What memexport needs to know about one CUDA device.

    Attributes:
        index: Device ordinal.
        name: Marketing name, e.g. ``"NVIDIA GeForce GTX 1080 Ti"``.
        compute_capability: ``(major, minor)``, e.g. ``(6, 1)``.
        total_memory: Bytes of device memory.
    """

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int

    @property
    def sm(self) -> str:
        """``"sm_61"`` for compute capability 6.1."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


class CudaApi:
    """The CUDA runtime subset memexport uses. Pointers and streams are plain ``int``s.

    Attributes:
        source: Which back end serves the calls (``cuda-python`` or the library path).
    """

    source = "none"

    def device_count(self) -> int:
        """Visible devices; 0 when the driver reports no device or is missing."""
        raise NotImplementedError

    def device_properties(self, index: int) -> DeviceProperties:
        raise NotImplementedError

    def set_device(self, index: int) -> None:
        raise NotImplementedError

    def mem_get_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes on the current device."""
        raise NotImplementedError

    def malloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def free(self, pointer: int) -> None:
        raise NotImplementedError

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory (needed for truly asynchronous copies)."""
        raise NotImplementedError

    def free_host(self, pointer: int) -> None:
        raise NotImplementedError

    def stream_create(self) -> int:
        raise NotImplementedError

    def stream_destroy(self, stream: int) -> None:
        raise NotImplementedError

    def stream_synchronize(self, stream: int) -> None:
        raise NotImplementedError

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        raise NotImplementedError

    def runtime_version(self) -> str:
        """CUDA runtime version as ``"12.4"``."""
        raise NotImplementedError

    def driver_version(self) -> str:
        """Newest CUDA version the installed driver supports, as ``"13.0"``."""
        raise NotImplementedError

    def is_pinned(self, pointer: int) -> bool:
        """Whether ``pointer`` is page-locked host memory from :meth:`malloc_host` (``cudaHostGetFlags``)."""
        raise NotImplementedError


def format_cuda_version(encoded: int) -> str:
    """CUDA encodes versions as ``1000 * major + 10 * minor`` (12040 -> ``"12.4"``)."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def _status_code(status: Any) -> int:
    # cuda-python returns enum members; ctypes returns ints.
    return int(getattr(status, "value", status))


class CudaPythonApi(CudaApi):
    """:class:`CudaApi` over cuda-python's runtime module (calls return ``(status, *values)`` tuples)."""

    source = "cuda-python"

    def __init__(self, module: Any) -> None:
        self.rt = module

    def _call(self, what: str, func: Callable[..., Any], *args: Any) -> Any:
        result = func(*args)
        status, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        code = _status_code(status)
        if code != 0:
            name = getattr(status, "name", f"error {code}")
            raise CudaError(f"CUDA {what} failed: {name} ({code}); check the driver with `nvidia-smi` and `memexport doctor`", code)
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def device_count(self) -> int:
        result = self.rt.cudaGetDeviceCount()
        if _status_code(result[0]) in NO_DEVICE_ERRORS:
            return 0
        return int(self._call("cudaGetDeviceCount", lambda: result))

    def device_properties(self, index: int) -> DeviceProperties:
        props = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties, index)
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
        return DeviceProperties(index, str(name), (int(props.major), int(props.minor)), int(props.totalGlobalMem))

    def set_device(self, index: int) -> None:
        self._call("cudaSetDevice", self.rt.cudaSetDevice, index)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._call("cudaMemGetInfo", self.rt.cudaMemGetInfo)
        return int(free), int(total)

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", self.rt.cudaMalloc, nbytes))

    def free(self, pointer: int) -> None:
        self._call("cudaFree", self.rt.cudaFree, pointer)

    def malloc_host(self, nbytes: int) -> int:
        return int(self._call("cudaMallocHost", self.rt.cudaMallocHost, nbytes))

    def free_host(self, pointer: int) -> None:
        self._call("cudaFreeHost", self.rt.cudaFreeHost, pointer)

    def stream_create(self) -> int:
        return int(self._call("cudaStreamCreate", self.rt.cudaStreamCreate))

    def stream_destroy(self, stream: int) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy, stream)

    def stream_synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize, stream)

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync, dst, src, nbytes, self.rt.cudaMemcpyKind(kind), stream)

    def runtime_version(self) -> str:
        return format_cuda_version(int(self._call("cudaRuntimeGetVersion", self.rt.cudaRuntimeGetVersion)))

    def driver_version(self) -> str:
        return format_cuda_version(int(self._call("cudaDriverGetVersion", self.rt.cudaDriverGetVersion)))

    def is_pinned(self, pointer: int) -> bool:
        return _status_code(self.rt.cudaHostGetFlags(pointer)[0]) == 0


class CtypesCudaApi(CudaApi):
    """:class:`CudaApi` over ``libcudart`` through ``ctypes`` (no Python CUDA package needed)."""

    def __init__(self, library: Any, source: str = "libcudart") -> None:
        self.lib = library
        self.source = source

    def _check(self, what: str, status: int) -> None:
        if status != 0:
            name = NO_DEVICE_ERRORS.get(status, f"error {status}")
            try:
                self.lib.cudaGetErrorName.restype = ctypes.c_char_p
                name = self.lib.cudaGetErrorName(ctypes.c_int(status)).decode() or name
            except (AttributeError, UnicodeDecodeError):
                pass
            raise CudaError(f"CUDA {what} failed: {name} ({status}); check the driver with `nvidia-smi` and `memexport doctor`", status)

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        status = self.lib.cudaGetDeviceCount(ctypes.byref(count))
        if status in NO_DEVICE_ERRORS:
            return 0
        self._check("cudaGetDeviceCount", status)
        return count.value

    def _attribute(self, attribute: int, index: int) -> int:
        value = ctypes.c_int(0)
        self._check("cudaDeviceGetAttribute", self.lib.cudaDeviceGetAttribute(ctypes.byref(value), ctypes.c_int(attribute), ctypes.c_int(index)))
        return value.value

    def device_properties(self, index: int) -> DeviceProperties:
        buffer = ctypes.create_string_buffer(_DEVICE_PROP_BUFFER)
        self._check("cudaGetDeviceProperties", self.lib.cudaGetDeviceProperties(buffer, ctypes.c_int(index)))
        name = buffer.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace")
        major = self._attribute(ATTR_COMPUTE_CAPABILITY_MAJOR, index)
        minor = self._attribute(ATTR_COMPUTE_CAPABILITY_MINOR, index)
        previous = ctypes.c_int(0)
        self._check("cudaGetDevice", self.lib.cudaGetDevice(ctypes.byref(previous)))
        self.set_device(index)
        try:
            _, total = self.mem_get_info()
        finally:
            self.set_device(previous.value)
        return DeviceProperties(index, name, (major, minor), total)

    def set_device(self, index: int) -> None:
        self._check("cudaSetDevice", self.lib.cudaSetDevice(ctypes.c_int(index)))

    def mem_get_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self._check("cudaMemGetInfo", self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)))
        return free.value, total.value

    def _alloc(self, what: str, func: Any, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self._check(what, func(ctypes.byref(pointer), ctypes.c_size_t(nbytes)))
        return int(pointer.value or 0)

    def malloc(self, nbytes: int) -> int:
        return self._alloc("cudaMalloc", self.lib.cudaMalloc, nbytes)

    def free(self, pointer: int) -> None:
        self._check("cudaFree", self.lib.cudaFree(ctypes.c_void_p(pointer)))

    def malloc_host(self, nbytes: int) -> int:
        return self._alloc("cudaMallocHost", self.lib.cudaMallocHost, nbytes)

    def free_host(self, pointer: int) -> None:
        self._check("cudaFreeHost", self.lib.cudaFreeHost(ctypes.c_void_p(pointer)))

    def stream_create(self) -> int:
        stream = ctypes.c_void_p()
        self._check("cudaStreamCreate", self.lib.cudaStreamCreate(ctypes.byref(stream)))
        return int(stream.value or 0)

    def stream_destroy(self, stream: int) -> None:
        self._check("cudaStreamDestroy", self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)))

    def stream_synchronize(self, stream: int) -> None:
        self._check("cudaStreamSynchronize", self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)))

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._check(
            "cudaMemcpyAsync",
            self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), ctypes.c_int(kind), ctypes.c_void_p(stream)),
        )

    def runtime_version(self) -> str:
        version = ctypes.c_int(0)
        self._check("cudaRuntimeGetVersion", self.lib.cudaRuntimeGetVersion(ctypes.byref(version)))
        return format_cuda_version(version.value)

    def driver_version(self) -> str:
        version = ctypes.c_int(0)
        self._check("cudaDriverGetVersion", self.lib.cudaDriverGetVersion(ctypes.byref(version)))
        return format_cuda_version(version.value)

    def is_pinned(self, pointer: int) -> bool:
        flags = ctypes.c_uint(0)
        return self.lib.cudaHostGetFlags(ctypes.byref(flags), ctypes.c_void_p(pointer)) == 0


def libcudart_candidates() -> list[str]:
    """Where ``libcudart`` may live, most specific first.

    Order: ``$MEMEXPORT_LIBCUDART``; the NVIDIA pip wheels on ``sys.path`` (CUDA 13's
    ``nvidia/cu13/lib``, CUDA 12's ``nvidia/cuda_runtime/lib``); ``$CUDA_HOME``/``$CUDA_PATH``;
    ``/usr/local/cuda``; then the loader's own search, newest soname first (``libcudart.so.13``,
    ``.so.12``, ...). Within a folder, the newest version first.
    """
    names: list[str] = []
    if os.environ.get("MEMEXPORT_LIBCUDART"):
        names.append(os.environ["MEMEXPORT_LIBCUDART"])
    roots = [os.path.join(p, "nvidia", wheel, "lib") for p in sys.path if p for wheel in WHEEL_FOLDERS]
    roots += [os.path.join(os.environ[v], "lib64") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots.append("/usr/local/cuda/lib64")
    for root in roots:
        names += sorted(glob.glob(os.path.join(root, "libcudart.so*")), key=_soname_version, reverse=True)
    found = ctypes.util.find_library("cudart")
    if found:
        names.append(found)
    names += list(SONAMES)
    return list(dict.fromkeys(names))


def _soname_version(path: str) -> tuple[int, ...]:
    """``libcudart.so.13.0.48`` -> ``(13, 0, 48)``: newest first, numerically (``.so.13`` after ``.so.9`` as text)."""
    suffix = os.path.basename(path).partition(".so")[2]
    return tuple(int(p) for p in suffix.split(".") if p.isdigit())


_CACHED: list[CudaApi] = []


def load_cuda(prefer: str = "auto") -> CudaApi:
    """The CUDA runtime API, loaded once per process.

    Args:
        prefer: ``"auto"`` (default: cuda-python, else ``ctypes``), ``"cuda-python"`` or ``"ctypes"``.

    Raises:
        BackendUnavailableError: Neither cuda-python nor a loadable ``libcudart`` is present.
    """
    if _CACHED and prefer == "auto":
        return _CACHED[0]
    api: CudaApi | None = None
    if prefer in ("auto", "cuda-python"):
        # cuda-python >= 12.6 has cuda.bindings.runtime; older releases cuda.cudart.
        module = optional("cuda.bindings.runtime") or optional("cuda.cudart")
        if module is not None:
            api = CudaPythonApi(module)
    if api is None and prefer in ("auto", "ctypes"):
        for name in libcudart_candidates():
            try:
                api = CtypesCudaApi(ctypes.CDLL(name), name)
                break
            except OSError:
                continue
    if api is None:
        raise BackendUnavailableError(
            "CUDA runtime not found (neither cuda-python nor libcudart); install it with `pip install 'memexport[tensorrt]'` "
            "(cuda-python) or set MEMEXPORT_LIBCUDART to libcudart.so"
        )
    if prefer == "auto":
        _CACHED.append(api)
    return api


def list_devices(api: CudaApi | None = None) -> list[DeviceProperties]:
    """Every visible device; empty when CUDA or a GPU is absent (never raises for that)."""
    try:
        api = api or load_cuda()
        return [api.device_properties(index) for index in range(api.device_count())]
    except BackendUnavailableError:
        return []


def loaded_libcudart(maps: str = "/proc/self/maps") -> str | None:
    """The libcudart file mapped into this process (Linux), or ``None`` (none loaded, or linked into cuda-python)."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parts = line.split(None, 5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libcudart.so"):
                    return parts[5].strip()
    except OSError:
        return None
    return None


def cuda_report(api: CudaApi | None = None) -> dict[str, Any]:
    """Which CUDA runtime this process uses and what it sees: for ``make test-cuda`` and bug reports.

    Raises:
        BackendUnavailableError: No CUDA runtime at all (see :func:`load_cuda`).
    """
    api = api or load_cuda()
    try:
        driver: str | None = api.driver_version()
    except CudaError:
        driver = None
    if driver == "0.0":  # cudaDriverGetVersion's answer when no driver is installed
        driver = None
    devices = [{"index": d.index, "name": d.name, "sm": d.sm, "total_memory": d.total_memory} for d in list_devices(api)]
    return {
        "source": api.source,
        "library": loaded_libcudart(),
        "runtime_version": api.runtime_version(),
        "driver_version": driver,
        "devices": devices,
        # The CUDA layer is torch- and TensorRT-free: neither is imported to get here.
        "torch_loaded": "torch" in sys.modules,
        "tensorrt_loaded": "tensorrt" in sys.modules,
    }


def main() -> int:
    """``python -m memexport.runtime.cuda [ctypes|cuda-python]``: print :func:`cuda_report` as JSON."""
    import json

    try:
        report = cuda_report(load_cuda(sys.argv[1] if len(sys.argv) > 1 else "auto"))
    except BackendUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
