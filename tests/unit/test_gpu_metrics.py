"""worker/metrics.py's NVML collector, one function: what it makes of NVML's answers. No GPU is lent to this
project's machines, so NVML itself is stood in for by an object answering its calls with fixed figures;
the absence of the series without a GPU is checked on the real worker (tests/e2e/test_operations.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import GpuCollector, resolution


class TwoGpus:
    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(handle + 1) * 10 * 2**30, total=141 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=87 if handle == 0 else 3)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 61 + handle


def test_each_gpu_is_a_series_of_its_own() -> None:
    collector = GpuCollector.__new__(GpuCollector)
    collector.nvml = TwoGpus()
    registry = CollectorRegistry()
    registry.register(collector)
    samples = {
        (s.name, s.labels["gpu"]): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples == {
        ("klein_gpu_memory_used_bytes", "0"): 10 * 2**30,
        ("klein_gpu_memory_used_bytes", "1"): 20 * 2**30,
        ("klein_gpu_memory_total_bytes", "0"): 141 * 2**30,
        ("klein_gpu_memory_total_bytes", "1"): 141 * 2**30,
        ("klein_gpu_utilization_ratio", "0"): 0.87,
        ("klein_gpu_utilization_ratio", "1"): 0.03,
        ("klein_gpu_temperature_celsius", "0"): 61,
        ("klein_gpu_temperature_celsius", "1"): 62,
    }


def test_resolution_labels_stay_few() -> None:
    assert resolution(1024, 1024) == "1024x1024"
    assert resolution(1360, 768) == "1360x768"  # 16:9
    assert resolution(1344, 768) == "1344x768"  # Klein generate's landscape
    assert resolution(1008, 1008) == "other"
