"""HTTP load generators, each run as its own process: wrk when installed, else this Python one.

`python -m bench.loadgen SPEC.json OUT.json` runs the load a spec describes and writes what it measured.
The Python generator speaks HTTP/1.1 keep-alive over raw asyncio streams (uvloop when present), so it
costs the machine little more than wrk does; `Loadgen.run` picks the generator and starts the process.

Spec (JSON): url, method, headers, body, paths (cycled; default the url's path), connections, and either
duration_s (closed loop: every connection sends its next request as soon as the last is answered) or
requests (that many in all, each connection taking the next until none is left; with
`record: true` every response's status, latency, end time and JSON body is kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0…100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def raise_nofile(wanted: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------------------------------------------
# The Python generator (runs in the child process)


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes, want_body: bool) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if chunked:
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        elif length is not None:
            body = await self.reader.readexactly(length)
        else:
            body = await self.reader.read()
            close = True
        if close:
            await self.close()
        return status, body if want_body else b""

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def _requests(spec: dict[str, Any]) -> list[bytes]:
    parts = urlsplit(spec["url"])
    paths = spec.get("paths") or [parts.path or "/"]
    body = spec.get("body", "").encode()
    headers = {"Host": parts.netloc, **spec.get("headers", {})}
    if body or spec.get("method", "GET") in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(len(body))
    header_block = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return [f"{spec.get('method', 'GET')} {path} HTTP/1.1\r\n{header_block}\r\n".encode() + body for path in paths]


async def _run_python(spec: dict[str, Any]) -> dict[str, Any]:
    parts = urlsplit(spec["url"])
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = _requests(spec)
    connections = int(spec.get("connections", 1))
    record = bool(spec.get("record"))
    total = spec.get("requests")
    duration = spec.get("duration_s")
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    records: list[dict[str, Any]] = []
    counter = iter(range(1 << 62))
    started = time.perf_counter()
    deadline = started + float(duration) if duration is not None else float("inf")

    async def one_connection() -> None:
        conn = _Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                n = next(counter)
                if total is not None and n >= total:
                    return
                data = requests[n % len(requests)]
                t0 = time.perf_counter()
                try:
                    status, body = await conn.request(data, record)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await conn.close()
                    if record:
                        records.append({"n": n, "error": repr(exc), "end": time.time()})
                    continue
                t1 = time.perf_counter()
                if t1 > deadline:  # answered after the window closed: not counted
                    return
                latencies.append(t1 - t0)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if record:
                    try:
                        parsed: Any = json.loads(body) if body else None
                    except ValueError:
                        parsed = body[:200].decode(errors="replace")
                    records.append(
                        {"n": n, "status": status, "latency_ms": (t1 - t0) * 1000, "end": time.time(), "body": parsed}
                    )
        finally:
            await conn.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    elapsed = (min(time.perf_counter(), deadline) if duration is not None else time.perf_counter()) - started
    ok = sum(count for status, count in statuses.items() if status.startswith(("2", "3")))
    result: dict[str, Any] = {
        "generator": "python",
        "requests": len(latencies),
        "duration_s": elapsed,
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "statuses": statuses,
        "non_2xx": len(latencies) - ok,
        "socket_errors": sum(errors.values()),
        "errors": errors,
    }
    if record:
        result["records"] = sorted(records, key=lambda r: r["n"])
    return result


def _child_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    raise_nofile(int(spec.get("connections", 1)) + 1024)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    result = asyncio.run(_run_python(spec))
    Path(out_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# wrk


_WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH-JSON {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"max_us":%.1f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def wrk_script(spec: dict[str, Any]) -> str:
    lines = [f"wrk.method = {_lua_string(spec.get('method', 'GET'))}"]
    if spec.get("body"):
        lines.append(f"wrk.body = {_lua_string(spec['body'])}")
    for name, value in spec.get("headers", {}).items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    paths = spec.get("paths")
    if paths:
        lines.append("local paths = {" + ", ".join(_lua_string(p) for p in paths) + "}")
        lines.append("local i = 0")
        lines.append("request = function()\n  i = i % #paths + 1\n  return wrk.format(nil, paths[i])\nend")
    return "\n".join(lines) + "\n" + _WRK_DONE


def wrk_version() -> str | None:
    binary = shutil.which("wrk")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "wrk"


def _run_wrk(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    script = workdir / "wrk.lua"
    script.write_text(wrk_script(spec))
    duration = max(1, round(float(spec["duration_s"])))
    args = ["wrk", "-t", str(spec.get("threads", 1)), "-c", str(spec.get("connections", 1))]
    args += ["-d", f"{duration}s", "--timeout", f"{spec.get('timeout_s', 30)}s", "-s", str(script), spec["url"]]
    out = subprocess.run(args, capture_output=True, text=True, check=False, timeout=duration + 120)
    match = re.search(r"BENCH-JSON (\{.*\})", out.stdout)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "generator": "wrk",
        "requests": raw["requests"],
        "duration_s": seconds,
        "rps": raw["requests"] / seconds if seconds > 0 else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "statuses": {},
        "non_2xx": raw["status"],
        "socket_errors": socket_errors,
        "errors": {k: raw[k] for k in ("connect", "read", "write", "timeout") if raw[k]},
    }


# ---------------------------------------------------------------------------------------------------------------
# The parent's side


@dataclass
class Loadgen:
    """Which generator runs closed-loop HTTP load: 'wrk' or 'python' (recorded runs are always Python)."""

    kind: str

    @classmethod
    def choose(cls, wanted: str) -> Loadgen:
        if wanted == "python":
            return cls("python")
        if wrk_version() is not None:
            return cls("wrk")
        if wanted == "wrk":
            raise SystemExit(
                "wrk is not installed (apt-get install wrk, or brew install wrk); "
                "or run with --loadgen python (a Python generator process; numbers are not comparable with wrk's)"
            )
        return cls("python")

    def describe(self) -> str:
        if self.kind == "wrk":
            return f"{wrk_version()} (1 thread), one process beside the server"
        return "bench.loadgen (Python, asyncio + uvloop, raw HTTP/1.1 keep-alive), one process beside the server"

    def run(self, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="klein-loadgen-") as tmp:
            workdir = Path(tmp)
            if self.kind == "wrk" and "duration_s" in spec and not spec.get("record"):
                return _run_wrk(spec, workdir)
            return run_python(spec, workdir, timeout)


def run_python(spec: dict[str, Any], workdir: Path, timeout: float | None = None) -> dict[str, Any]:
    (workdir / "spec.json").write_text(json.dumps(spec))
    out = workdir / "out.json"
    args = [sys.executable, "-m", "bench.loadgen", str(workdir / "spec.json"), str(out)]
    if timeout is None:
        timeout = float(spec.get("duration_s") or 600) + 120
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=os.environ)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def start_python(spec: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a Python generator in the background (for clients the caller watches while they run)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(spec))
    out = workdir / "out.json"
    log = open(workdir / "loadgen.log", "wb")  # noqa: SIM115 - owned by the child process
    args = [sys.executable, "-m", "bench.loadgen", str(workdir / "spec.json"), str(out)]
    return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.loadgen SPEC.json OUT.json")
    raise SystemExit(_child_main(sys.argv[1], sys.argv[2]))
