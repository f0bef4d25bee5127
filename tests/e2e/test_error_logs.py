"""A 500 on a real API process logging as `klein up` does (console format): the client's key appears nowhere in
the log, each error costs the log a few kilobytes, and the event loop stays free for /healthz meanwhile.

The fault is a real one an outside request then runs into: the API's temporary folder disappears (a tmp cleaner,
a full or lost disk), so a multipart upload over 1 MiB, which Starlette spools to disk, fails with an OSError of
no dependency of ours, an unhandled error."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from core.tenants import IssuedKey
from ops.embedded import start_api
from tests.conftest import Stack

ERRORS = 8
SPOOLED = os.urandom(3 << 19)  # 1.5 MiB: over Starlette's 1 MiB in memory, so written to the temporary folder


def upload(url: str, key: str) -> httpx.Response:
    files = {"content": ("big.png", SPOOLED, "image/png")}
    return httpx.post(f"{url}/v1/files", headers={"apikey": key}, files=files, timeout=60)


def test_a_500_logs_no_key_a_bounded_traceback_and_leaves_the_loop_free(
    stack: Stack, tenant: IssuedKey, tmp_path: Path
) -> None:
    spool, log = tmp_path / "spool", tmp_path / "api-console.log"
    spool.mkdir()
    api, url = start_api(stack.env | {"KLEIN_LOG_FORMAT": "console", "TMPDIR": str(spool)}, log)
    try:
        assert upload(url, tenant.key).status_code == 422  # spooled to `spool` (Python keeps that folder)
        shutil.rmtree(spool)
        before = log.stat().st_size
        latencies: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not done.is_set():
                    started = time.perf_counter()
                    assert http.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - started)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            with ThreadPoolExecutor(ERRORS) as pool:
                answers = list(pool.map(lambda _: upload(url, tenant.key), range(ERRORS)))
        finally:
            done.set()
            prober.join()
        grown = log.read_bytes()[before:].decode()
    finally:
        api.stop()
    assert [a.status_code for a in answers] == [500] * ERRORS, [a.text for a in answers]
    assert answers[0].json() == {"error": "internal server error"}
    assert grown.count("FileNotFoundError") >= ERRORS, grown[-3000:]  # the traceback is there, plain
    assert tenant.key not in grown and tenant.key[:12] not in grown
    assert len(grown) < ERRORS * 16_000, f"{len(grown)} bytes of log for {ERRORS} errors"
    assert latencies and max(latencies) < 1.0, f"/healthz took up to {max(latencies):.2f} s meanwhile"
