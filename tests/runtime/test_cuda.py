"""The CUDA runtime wrapper: status handling of both back ends, versions, and behaviour without a GPU."""

from __future__ import annotations

import re
import sys
import types

import pytest

from memexport.core.errors import BackendUnavailableError, CudaError
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


# ------------------------------------------------------------------ finding libcudart (CUDA 13 too)


def test_libcudart_candidates_find_cuda13_wheels_and_sonames(monkeypatch, tmp_path):
    for var in ("MEMEXPORT_LIBCUDART", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    cu13 = tmp_path / "site13" / "nvidia" / "cu13" / "lib"
    cu12 = tmp_path / "site12" / "nvidia" / "cuda_runtime" / "lib"
    for folder, names in ((cu13, ("libcudart.so.13", "libcudart.so.13.0.96")), (cu12, ("libcudart.so.12",))):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site12"), str(tmp_path / "site13")])
    names = cuda.libcudart_candidates()
    # Both wheel layouts are searched; in a folder the newest file comes first.
    assert names.index(str(cu13 / "libcudart.so.13.0.96")) < names.index(str(cu13 / "libcudart.so.13"))
    assert str(cu12 / "libcudart.so.12") in names
    # The loader's own search tries CUDA 13 before CUDA 12.
    assert names.index("libcudart.so.13") < names.index("libcudart.so.12") < names.index("libcudart.so")


def test_sonames_sort_by_number_not_text():
    paths = ["/x/libcudart.so.9.2", "/x/libcudart.so.13", "/x/libcudart.so.12.4.127", "/x/libcudart.so"]
    assert sorted(paths, key=cuda._soname_version, reverse=True) == ["/x/libcudart.so.13", "/x/libcudart.so.12.4.127", "/x/libcudart.so.9.2", "/x/libcudart.so"]


def test_load_cuda_loads_libcudart_so_13_when_that_is_what_the_machine_has(monkeypatch):
    tried = []

    def cdll(name):
        tried.append(name)
        if name != "libcudart.so.13":
            raise OSError(f"{name}: cannot open shared object file")
        return FakeLib(0)

    monkeypatch.setattr(cuda, "libcudart_candidates", lambda: ["/nowhere/libcudart.so", *cuda.SONAMES])
    monkeypatch.setattr(cuda.ctypes, "CDLL", cdll)
    api = cuda.load_cuda(prefer="ctypes")
    assert isinstance(api, cuda.CtypesCudaApi) and api.source == "libcudart.so.13"
    assert tried == ["/nowhere/libcudart.so", "libcudart.so.13"]


def test_loaded_libcudart_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcudart.so.13\n"
        "7f04-7f05 rw-p 00000000 00:00 0 \n"
    )
    assert cuda.loaded_libcudart(str(maps)) == "/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcudart.so.13"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert cuda.loaded_libcudart(str(maps)) is None
    assert cuda.loaded_libcudart(str(tmp_path / "absent")) is None


# ------------------------------------------------ make test-cuda: the CUDA layer on a real GPU, no TensorRT

MIB = 2**20
CUDA_BACKENDS = pytest.mark.parametrize("prefer", ["ctypes", "cuda-python"])


def real_api(prefer: str) -> cuda.CudaApi:
    try:
        api = cuda.load_cuda(prefer=prefer)
    except BackendUnavailableError as exc:
        pytest.skip(f"{prefer}: {exc}")
    if api.device_count() == 0:
        pytest.skip("no CUDA GPU visible")
    api.set_device(0)
    return api


def host_bytes(pointer: int, nbytes: int):
    import ctypes

    import numpy as np

    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(pointer))


@pytest.mark.gpu
@CUDA_BACKENDS
def test_real_allocation_shows_in_mem_get_info(prefer):
    api = real_api(prefer)
    nbytes = 256 * MIB
    free_before, total = api.mem_get_info()  # after the context exists: the deltas are the allocation alone
    pointer = api.malloc(nbytes)
    try:
        free_during, _ = api.mem_get_info()
    finally:
        api.free(pointer)
    free_after, _ = api.mem_get_info()
    # cudaMalloc rounds up to its page size; 64 MiB of slack covers any granularity.
    assert nbytes <= free_before - free_during <= nbytes + 64 * MIB, (free_before, free_during)
    assert free_after - free_during >= nbytes - 2 * MIB, (free_during, free_after)  # given back on cudaFree
    assert 0 < free_before <= total


@pytest.mark.gpu
@CUDA_BACKENDS
def test_real_pinned_host_memory(prefer):
    import numpy as np

    api = real_api(prefer)
    nbytes = 4 * MIB
    pointer = api.malloc_host(nbytes)
    try:
        assert api.is_pinned(pointer)
        view = host_bytes(pointer, nbytes)
        view[:] = 0xA5
        assert int(view.sum()) == 0xA5 * nbytes  # writable and readable from the host
        pageable = np.zeros(nbytes, dtype=np.uint8)
        assert not api.is_pinned(pageable.ctypes.data)
    finally:
        api.free_host(pointer)


@pytest.mark.gpu
@CUDA_BACKENDS
def test_real_copies_on_a_stream_are_byte_for_byte(prefer):
    import numpy as np

    api = real_api(prefer)
    nbytes = 64 * MIB + 3  # an odd size: no rounding hides a short copy
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    device, src, dst, stream = api.malloc(nbytes), api.malloc_host(nbytes), api.malloc_host(nbytes), api.stream_create()
    try:
        host_bytes(src, nbytes)[:] = data
        host_bytes(dst, nbytes)[:] = 0
        api.memcpy_async(device, src, nbytes, cuda.MEMCPY_HOST_TO_DEVICE, stream)
        api.memcpy_async(dst, device, nbytes, cuda.MEMCPY_DEVICE_TO_HOST, stream)
        api.stream_synchronize(stream)
        back = host_bytes(dst, nbytes)
        mismatches = int(np.count_nonzero(back != data))
        assert mismatches == 0, f"{mismatches} of {nbytes} bytes differ after H2D+D2H on one stream"
        # A pageable source on the same stream (what the runner's callers may hand in) arrives intact too.
        pageable = data[::-1].copy()
        api.memcpy_async(device, pageable.ctypes.data, nbytes, cuda.MEMCPY_HOST_TO_DEVICE, stream)
        api.memcpy_async(dst, device, nbytes, cuda.MEMCPY_DEVICE_TO_HOST, stream)
        api.stream_synchronize(stream)
        assert np.array_equal(host_bytes(dst, nbytes), pageable)
    finally:
        api.stream_destroy(stream)
        api.free(device)
        api.free_host(src)
        api.free_host(dst)


@pytest.mark.gpu
@CUDA_BACKENDS
def test_real_runtime_report_names_the_library_and_versions(prefer):
    import json
    import os

    from packaging.version import Version

    api = real_api(prefer)
    report = cuda.cuda_report(api)
    print(f"\n{prefer}: {json.dumps(report)}")  # quoted by `make test-cuda` (pytest -s)
    assert re.fullmatch(r"\d+\.\d+", report["runtime_version"]) and report["devices"]
    assert report["driver_version"] is not None and Version(report["driver_version"]) >= Version(report["runtime_version"])
    if prefer == "ctypes":
        assert report["library"] and os.path.isfile(report["library"]) and "libcudart.so" in report["library"]


@pytest.mark.gpu
def test_the_cuda_layer_needs_neither_torch_nor_tensorrt():
    import json
    import subprocess

    result = subprocess.run([sys.executable, "-m", "memexport.runtime.cuda"], capture_output=True, text=True, timeout=120)
    if result.returncode == 2:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    if not report["devices"]:
        pytest.skip("no CUDA GPU visible")
    assert report["torch_loaded"] is False and report["tensorrt_loaded"] is False
