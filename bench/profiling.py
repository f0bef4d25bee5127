"""Summaries of py-spy profiles of the API under load (bench.platform --profile)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.common import ROOT

COMPONENTS = (
    ("api/", "api/ (ours)"),
    ("core/", "core/ (ours)"),
    ("models/", "models/ (ours)"),
    ("bench/", "bench/"),
    ("sqlalchemy/", "SQLAlchemy"),
    ("asyncpg/", "asyncpg"),
    ("redis/", "redis-py"),
    ("celery/", "Celery"),
    ("kombu/", "kombu"),
    ("fastapi/", "FastAPI"),
    ("starlette/", "Starlette"),
    ("pydantic", "pydantic"),
    ("uvicorn/", "uvicorn"),
    ("json/", "json (stdlib)"),
    ("asyncio/", "asyncio"),
    ("concurrent/", "thread pool"),
    ("threading.py", "threading"),
)


# Frames that only carry the process (entry point, server loop, thread bootstrap): left out of inclusive lists.
WRAPPERS = (
    "<frozen runpy>",
    "click/",
    "uvicorn/main.py",
    "uvicorn/__main__.py",
    "uvicorn/_compat.py",
    "uvicorn/server.py",
    "asyncio/runners.py",
    "threading.py",
    "concurrent/futures/thread.py",
    "anyio/",
)


def _component(frame: str) -> str:
    where = frame.partition(" (")[2]
    for marker, name in COMPONENTS:
        if where.startswith(marker) or f"/{marker}" in where:
            return name
    if where.startswith("asyncio/runners.py"):
        return "event loop (uvloop, httptools: native)"
    return where.split("/", 1)[0].split(".py", 1)[0] or "?"


def summarize_profile(raw: Path, top: int = 25) -> str:
    """py-spy's collapsed stacks (`--gil`: the thread running Python) → where the API's CPU goes.

    Self time by component (the package of the innermost frame; 'event loop' is uvloop and httptools
    working below Python), our own functions by inclusive time, and the library functions by inclusive
    time leaving out the frames every sample shares.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    components: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
        components[_component(frames[-1])] += count
        threads["worker threads (asyncio.to_thread)" if "threading.py" in stack else "event loop thread"] += count
    if not total:
        return "no samples\n"

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    ours = [(f, n) for f, n in inclusive.most_common() if _component(f).endswith("(ours)")][:top]
    libraries = [
        (f, n)
        for f, n in inclusive.most_common()
        if not _component(f).endswith("(ours)") and not any(w in f for w in WRAPPERS)
    ]
    lines = [f"{total} samples of the API process holding the GIL (py-spy --gil)", ""]
    lines += ["by thread:"] + [f"  {pct(n)}  {name}" for name, n in threads.most_common()]
    lines += ["", "self time by component:"] + [f"  {pct(n)}  {name}" for name, n in components.most_common(15)]
    lines += ["", "our functions, inclusive:"] + [f"  {pct(n)}  {f}" for f, n in ours]
    lines += ["", "library functions, inclusive:"] + [f"  {pct(n)}  {f}" for f, n in libraries[:top]]
    lines += ["", "self time by function:"] + [f"  {pct(n)}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def _frame(frame: str) -> str:
    """'fn (path/to/site-packages/pkg/mod.py:123)' → 'fn (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name
