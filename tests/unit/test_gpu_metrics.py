"""worker/gpu.py: which GPUs a worker reports (CUDA_VISIBLE_DEVICES read as CUDA reads it, a pure function), and
what its collector makes of NVML's answers and failures. No GPU is lent to this project's machines, so NVML is
stood in for by an object answering its calls with fixed figures (and pynvml's own exception classes); the
collector's `absent` state on the real worker without a GPU is checked in tests/e2e/test_operations.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.gpu import GpuCollector, visible_devices
from worker.metrics import resolution

UUIDS = ["GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "GPU-1a2b3c4d-0000-4106-c12f-20bd9faed9f6",
         "GPU-1a2b9999-0000-4106-c12f-20bd9faed9f6"]  # fmt: skip
HOST = [(0, UUIDS[0]), (1, UUIDS[1]), (2, UUIDS[2])]


@pytest.mark.parametrize(
    ("cuda_visible", "chosen"),
    [
        (None, [0, 1, 2]),  # unset: every GPU
        ("", []),  # set empty: none
        ("1", [1]),
        ("2,0", [2, 0]),  # CUDA's order is the variable's
        (" 1 , 2 ", [1, 2]),
        ("0,7,1", [0]),  # CUDA stops at the first entry naming no GPU
        ("-1,0", []),
        ("1,1", [1]),  # a GPU named twice: CUDA stops there
        (UUIDS[1], [1]),
        (UUIDS[2].upper(), [2]),  # any case
        ("GPU-8932f937", [0]),  # a unique prefix
        ("GPU-1a2b", []),  # a prefix of two: names none
        (f"{UUIDS[2]},0", [2, 0]),
        ("MIG-4d2f7a2c-1111-5e5e-9c9c-0123456789ab", []),
        ("nvidia0", []),
    ],
)
def test_cuda_visible_devices_names_the_gpus_a_worker_reports(cuda_visible: str | None, chosen: list[int]) -> None:
    assert visible_devices(cuda_visible, HOST) == [HOST[i] for i in chosen]


class ThreeGpus:
    """NVML's calls on a host of three GPUs; `broken` names the indices whose reads fail."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, broken: frozenset[int] = frozenset()) -> None:
        self.broken = broken

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(HOST)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return UUIDS[handle].encode()  # as older pynvml answers

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return UUIDS.index(uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        if handle in self.broken:
            raise pynvml.NVMLError_GpuIsLost(pynvml.NVML_ERROR_GPU_IS_LOST)
        return SimpleNamespace(used=(handle + 1) * 10 * 2**30, total=141 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=87 if handle == 1 else 3)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 61 + handle


class NoDriver(ThreeGpus):
    def nvmlInit(self) -> None:
        raise pynvml.NVMLError_LibraryNotFound(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


class BrokenInit(ThreeGpus):
    def nvmlInit(self) -> None:
        raise pynvml.NVMLError_NoPermission(pynvml.NVML_ERROR_NO_PERMISSION)


def scraped(collector: GpuCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


def state_of(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> tuple[str, float]:
    (state,) = [dict(labels)["state"] for name, labels in samples if name == "klein_gpu_collector_state"
                and samples[(name, labels)] == 1]  # fmt: skip
    return state, samples[("klein_gpu_collector_errors_total", ())]


def gpu_series(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[tuple[str, str, str], float]:
    return {
        (name, dict(labels)["gpu"], dict(labels)["gpu_uuid"]): value
        for (name, labels), value in samples.items()
        if not name.startswith("klein_gpu_collector")
    }


def test_a_worker_reports_only_the_gpu_it_was_given_labelled_with_its_uuid() -> None:
    samples = scraped(GpuCollector.start("1", nvml=ThreeGpus()))
    assert gpu_series(samples) == {
        ("klein_gpu_memory_used_bytes", "1", UUIDS[1]): 20 * 2**30,
        ("klein_gpu_memory_total_bytes", "1", UUIDS[1]): 141 * 2**30,
        ("klein_gpu_utilization_ratio", "1", UUIDS[1]): 0.87,
        ("klein_gpu_temperature_celsius", "1", UUIDS[1]): 62,
    }
    assert state_of(samples) == ("ok", 0)


def test_without_cuda_visible_devices_every_gpu_is_a_series_of_its_own() -> None:
    samples = gpu_series(scraped(GpuCollector.start(None, nvml=ThreeGpus())))
    assert {(gpu, uuid) for _, gpu, uuid in samples} == {(str(i), uuid) for i, uuid in HOST}


def test_no_driver_is_absent_and_a_failing_nvml_is_an_error() -> None:
    absent = scraped(GpuCollector.start(None, nvml=NoDriver()))
    assert gpu_series(absent) == {} and state_of(absent) == ("absent", 0)
    none_visible = scraped(GpuCollector.start("", nvml=ThreeGpus()))
    assert gpu_series(none_visible) == {} and state_of(none_visible) == ("absent", 0)
    broken = scraped(GpuCollector.start(None, nvml=BrokenInit()))
    assert gpu_series(broken) == {} and state_of(broken) == ("error", 1)


def test_a_gpu_that_cannot_be_read_is_an_error_counted_at_each_scrape() -> None:
    collector = GpuCollector.start("0,1", nvml=ThreeGpus(broken=frozenset({0})))
    first = scraped(collector)
    assert {gpu for _, gpu, _ in gpu_series(first)} == {"1"}, "the readable GPU is still reported"
    assert state_of(first) == ("error", 1)
    assert state_of(scraped(collector)) == ("error", 2)
    collector.nvml.broken = frozenset()  # the GPU is back
    assert state_of(scraped(collector)) == ("ok", 2)


def test_resolution_labels_stay_few() -> None:
    assert resolution(1024, 1024) == "1024x1024"
    assert resolution(1360, 768) == "1360x768"  # 16:9
    assert resolution(1344, 768) == "1344x768"  # Klein generate's landscape
    assert resolution(1008, 1008) == "other"
