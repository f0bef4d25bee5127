"""What build a process runs, for `klein_build_info{version, revision, python} 1` in every process's metrics:
the package's version (pyproject.toml, as installed), the source revision the image was built from
(`KLEIN_REVISION`, a build argument of deploy/Dockerfile.*; "unknown" where none was given) and Python's."""

from __future__ import annotations

import os
import platform
from functools import cache
from importlib import metadata

REVISION_VARIABLE = "KLEIN_REVISION"


@cache
def build_labels() -> dict[str, str]:
    try:
        version = metadata.version("klein-serve")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "unknown"
    revision = os.environ.get(REVISION_VARIABLE, "").strip()[:64] or "unknown"
    return {"version": version, "revision": revision, "python": platform.python_version()}
