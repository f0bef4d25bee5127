"""`klein_build_info{version, revision, python} 1`, in every process's metrics (the API's, a GPU worker's, the
webhook worker's: each imports this module with its own metrics): the package's version (pyproject.toml, as
installed), the source revision its image was built from (`KLEIN_REVISION`, a build argument of
deploy/Dockerfile.*; "unknown" where none was given) and Python's."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from prometheus_client import Gauge


def build_labels() -> dict[str, str]:
    try:
        version = metadata.version("klein-serve")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "unknown"
    revision = os.environ.get("KLEIN_REVISION", "").strip()[:64] or "unknown"
    return {"version": version, "revision": revision, "python": platform.python_version()}


# multiprocess_mode: several API processes sharing PROMETHEUS_MULTIPROC_DIR answer one series, not one per pid.
BUILD_INFO = Gauge(
    "klein_build_info", "The build this process runs", ["version", "revision", "python"], multiprocess_mode="max"
)
BUILD_INFO.labels(**build_labels()).set(1)
