"""A GPU worker's GPU series, read from NVML (`nvidia-ml-py`) at each scrape: memory, utilisation and temperature
of the GPUs this worker uses, not of every GPU on its host: those CUDA_VISIBLE_DEVICES names (`visible_devices`).
Each series carries the GPU's NVML index (`gpu`) and its UUID (`gpu_uuid`, the label DCGM exporter calls `UUID`:
docs/operations.md joins the two).

`klein_gpu_collector_state{state}` tells apart a host without NVIDIA GPU or driver (`absent`: no GPU series, as
expected) from a collector that fails (`error`: NVML started but a read failed; `klein_gpu_collector_errors_total`
counts them) and a working one (`ok`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Device = tuple[int, str]  # NVML's index and UUID of one GPU
STATES = ("absent", "ok", "error")
# NVML's answers where no NVIDIA driver or library is: nothing to collect, not a fault.
_ABSENT = {"NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "ImportError", "ModuleNotFoundError"}


def visible_devices(cuda_visible: str | None, devices: Sequence[Device]) -> list[Device]:
    """The GPUs a CUDA process sees, read as CUDA reads CUDA_VISIBLE_DEVICES: unset, all of them; else its
    comma-separated entries in order, each an index or a UUID ("GPU-…"; a unique prefix will do), up to the first
    entry that names no GPU (or one named already). MIG instances ("MIG-…") name none here.

    Indices are NVML's, which are CUDA's where CUDA_DEVICE_ORDER=PCI_BUS_ID; on a host of mixed GPUs give UUIDs
    or set that order (CUDA's default puts the fastest first)."""
    if cuda_visible is None:
        return list(devices)
    chosen: list[Device] = []
    for entry in (part.strip() for part in cuda_visible.split(",")):
        if entry.isdecimal():
            named = [device for device in devices if device[0] == int(entry)]
        elif entry.upper().startswith("GPU-"):
            named = [device for device in devices if device[1].lower().startswith(entry.lower())]
        else:
            named = []
        if len(named) != 1 or named[0] in chosen:
            break
        chosen.append(named[0])
    return chosen


class GpuCollector(Collector):
    """The figures of this worker's GPUs, read at scrape time, and the collector's own state."""

    def __init__(self, nvml: Any, handles: Sequence[tuple[Device, Any]], state: str) -> None:
        self.nvml = nvml
        self.handles = list(handles)  # ((index, uuid), NVML handle) of each GPU this worker uses
        self.state = state
        self.errors = 0 if state != "error" else 1

    @classmethod
    def start(cls, cuda_visible: str | None, nvml: Any = None) -> GpuCollector:
        """NVML started and asked for the devices CUDA_VISIBLE_DEVICES names (`nvml`: pynvml, or a stand-in)."""
        try:
            if nvml is None:
                import pynvml

                nvml = pynvml
            nvml.nvmlInit()
            devices = [(i, _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))))
                       for i in range(nvml.nvmlDeviceGetCount())]  # fmt: skip
            chosen = visible_devices(cuda_visible, devices)
            handles = [(device, nvml.nvmlDeviceGetHandleByUUID(device[1])) for device in chosen]
        except Exception as exc:  # pynvml raises NVMLError_* (LibraryNotFound, DriverNotLoaded, ...)
            absent = type(exc).__name__ in _ABSENT
            log.log(logging.INFO if absent else logging.WARNING, "no GPU metrics: NVML %s", type(exc).__name__)
            return cls(nvml, [], "absent" if absent else "error")
        if not handles:
            log.info("no GPU metrics: CUDA_VISIBLE_DEVICES=%r names none of %d GPUs", cuda_visible, len(devices))
        return cls(nvml, handles, "ok" if handles else "absent")

    def collect(self) -> Iterator[Metric]:
        nvml = self.nvml
        labels = ["gpu", "gpu_uuid"]
        used = GaugeMetricFamily("klein_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
        total = GaugeMetricFamily("klein_gpu_memory_total_bytes", "GPU memory in all", labels=labels)
        busy = GaugeMetricFamily("klein_gpu_utilization_ratio", "GPU busy time, last sample period", labels=labels)
        heat = GaugeMetricFamily("klein_gpu_temperature_celsius", "GPU temperature", labels=labels)
        failed = False
        for (index, uuid), handle in self.handles:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                figures = (memory.used, memory.total, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100,
                           nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))  # fmt: skip
            except Exception as exc:  # a lost GPU (NVMLError_GpuIsLost), a driver reset, ...
                log.warning("GPU %d (%s) unreadable: %s", index, uuid, type(exc).__name__)
                self.errors += 1
                failed = True
                continue
            for family, figure in zip((used, total, busy, heat), figures, strict=True):
                family.add_metric([str(index), uuid], figure)
        if self.handles:
            self.state = "error" if failed else "ok"
            yield from (used, total, busy, heat)
        state = GaugeMetricFamily(
            "klein_gpu_collector_state",
            "The GPU collector: absent (no NVIDIA GPU or driver), ok, error",
            labels=["state"],
        )
        for name in STATES:
            state.add_metric([name], 1.0 if name == self.state else 0.0)
        yield state
        yield CounterMetricFamily("klein_gpu_collector_errors", "Failed NVML starts and reads", value=self.errors)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older pynvml answers bytes


def register_collector() -> GpuCollector:
    """The GPU series of the GPUs CUDA_VISIBLE_DEVICES names, in the default registry."""
    collector = GpuCollector.start(os.environ.get("CUDA_VISIBLE_DEVICES"))
    REGISTRY.register(collector)
    return collector
