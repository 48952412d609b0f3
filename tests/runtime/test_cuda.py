"""The CUDA runtime wrapper: status handling of both back ends, versions, and behaviour without a GPU."""

from __future__ import annotations

import re
import types

import pytest

from memexport.errors import BackendUnavailableError, CudaError
from memexport.runtime import cuda


def test_cuda_version_format():
    assert cuda.format_cuda_version(12040) == "12.4" and cuda.format_cuda_version(11080) == "11.8"


class Status:
    def __init__(self, value: int, name: str) -> None:
        self.value, self.name = value, name


def fake_cuda_python(count_status: int = 0) -> types.SimpleNamespace:
    ok = Status(0, "cudaSuccess")
    props = types.SimpleNamespace(name=b"NVIDIA GeForce GTX 1080 Ti\0\0", major=6, minor=1, totalGlobalMem=11 * 2**30)
    return types.SimpleNamespace(
        cudaGetDeviceCount=lambda: (Status(count_status, "cudaErrorNoDevice") if count_status else ok, 1),
        cudaGetDeviceProperties=lambda i: (ok, props),
        cudaMemGetInfo=lambda: (ok, 5, 11),
        cudaMalloc=lambda n: (Status(2, "cudaErrorMemoryAllocation"), 0),
        cudaRuntimeGetVersion=lambda: (ok, 12040),
    )


def test_cuda_python_adapter():
    api = cuda.CudaPythonApi(fake_cuda_python())
    assert api.device_count() == 1
    assert api.device_properties(0) == cuda.DeviceProperties(0, "NVIDIA GeForce GTX 1080 Ti", (6, 1), 11 * 2**30)
    assert api.mem_get_info() == (5, 11) and api.runtime_version() == "12.4"
    with pytest.raises(CudaError, match=r"cudaMalloc failed: cudaErrorMemoryAllocation \(2\)") as caught:
        api.malloc(1 << 40)
    assert caught.value.code == 2
    assert cuda.CudaPythonApi(fake_cuda_python(count_status=100)).device_count() == 0  # no GPU is not an error


class FakeLib:
    """libcudart through ctypes: functions return status ints."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.cudaGetDeviceCount = lambda ref: status
        self.cudaMalloc = lambda ref, size: status


def test_ctypes_adapter_statuses():
    assert cuda.CtypesCudaApi(FakeLib(35)).device_count() == 0  # insufficient driver: no usable GPU
    with pytest.raises(CudaError, match="cudaMalloc failed: error 2"):
        cuda.CtypesCudaApi(FakeLib(2)).malloc(16)


def test_load_cuda_without_cuda_is_one_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setattr(cuda, "libcudart_candidates", lambda: ["/nonexistent/libcudart.so"])
    monkeypatch.setattr(cuda, "_CACHED", [])
    with pytest.raises(BackendUnavailableError, match="CUDA runtime not found.*MEMEXPORT_LIBCUDART"):
        cuda.load_cuda(prefer="ctypes")
    assert cuda.list_devices() == []  # never raises for a missing CUDA


def test_libcudart_search_honours_the_override(monkeypatch):
    monkeypatch.setenv("MEMEXPORT_LIBCUDART", "/opt/custom/libcudart.so.12")
    assert cuda.libcudart_candidates()[0] == "/opt/custom/libcudart.so.12"


@pytest.mark.gpu
def test_real_cuda_roundtrip():
    import ctypes

    import numpy as np

    try:
        api = cuda.load_cuda()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if api.device_count() == 0:
        pytest.skip("no CUDA GPU visible")
    api.set_device(0)
    free0, total = api.mem_get_info()
    data = np.arange(1024, dtype=np.float32)
    device, host, stream = api.malloc(data.nbytes), api.malloc_host(data.nbytes), api.stream_create()
    try:
        assert api.mem_get_info()[0] <= free0
        api.memcpy_async(device, data.ctypes.data, data.nbytes, cuda.MEMCPY_HOST_TO_DEVICE, stream)
        api.memcpy_async(host, device, data.nbytes, cuda.MEMCPY_DEVICE_TO_HOST, stream)
        api.stream_synchronize(stream)
        back = np.ctypeslib.as_array((ctypes.c_float * 1024).from_address(host))
        assert np.array_equal(back, data)
    finally:
        api.free(device)
        api.free_host(host)
        api.stream_destroy(stream)
    props = api.device_properties(0)
    assert props.total_memory == total and props.compute_capability >= (5, 0) and props.name


def test_real_libcudart_without_a_gpu_reports_no_device():
    """Where a libcudart is installed but no driver/GPU is (as on CI machines with the CUDA toolkit)."""
    try:
        api = cuda.load_cuda(prefer="ctypes")
    except BackendUnavailableError:
        pytest.skip("no libcudart on this machine")
    if api.device_count() > 0:
        pytest.skip("a GPU is visible; covered by test_real_cuda_roundtrip")
    assert re.fullmatch(r"\d+\.\d+", api.runtime_version())
    from memexport.runtime.budget import free_vram

    assert free_vram() is None  # bench then leaves the VRAM columns empty
    with pytest.raises(CudaError, match=r"cudaMemGetInfo failed: cudaError\w+ \(\d+\)"):
        api.mem_get_info()
