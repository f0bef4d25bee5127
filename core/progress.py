"""A prediction's live events and the fleet's pace, in Redis.

Each running prediction has a stream, `<queue>:events:<id>`: its worker appends `status` (claimed, by whom),
`progress` (denoising steps, at most every `progress_interval_s`) and `log` entries (encode, upload), and
publishes the id on `settings.progress_channel` with each, in the same round trip. Status views read the
stream for `progress` and `logs`; event streams (api/routes/stream.py) replay it from a `Last-Event-ID`,
woken by one subscription per API process. A stream expires an hour after its last entry; the logs stay
with the result in the row (`predictions.logs`).

The fleet's pace, for queue ETAs: live workers in a sorted set by last heartbeat (`<queue>:workers`, written by
core/workers.py), and
the last images' run times in a list (`<queue>:recent-ms`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from core.queue import model_queue
from core.settings import Settings

STREAM_TTL_S = 3600
MAX_ENTRIES = 200  # per prediction: steps are throttled, so this is far more than one run writes
LIVE_WORKER_S = 30.0  # the registry's "lost" (core/workers.py); the API counts by KLEIN_LIVE_WORKER_S
RECENT_RUNS = 20


def stream_key(settings: Settings, prediction_id: str) -> str:
    return f"{settings.queue_name}:events:{prediction_id}"


def workers_key(settings: Settings, model: str) -> str:
    """The live workers of one model (each model has its own queue and pace)."""
    return f"{model_queue(settings.queue_name, model)}:workers"


def recent_key(settings: Settings, model: str) -> str:
    return f"{model_queue(settings.queue_name, model)}:recent-ms"


def log_line(message: str, at: datetime | None = None) -> dict[str, str]:
    return {"at": (at or datetime.now(UTC)).isoformat(timespec="milliseconds"), "message": message}


def append(pipe: Any, settings: Settings, prediction_id: str, kind: str, data: dict[str, Any]) -> None:
    """Queue on `pipe` (a redis-py pipeline) the entry and the notice."""
    key = stream_key(settings, prediction_id)
    pipe.xadd(key, {"type": kind, "data": orjson.dumps(data)}, maxlen=MAX_ENTRIES, approximate=True)
    pipe.expire(key, STREAM_TTL_S)
    pipe.publish(settings.progress_channel, prediction_id)


def entries(raw: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """XRANGE's answer as (entry id, type, data)."""
    parsed = []
    for entry_id, fields in raw or ():
        kind = fields.get(b"type", fields.get("type", b""))
        data = fields.get(b"data", fields.get("data", b"{}"))
        parsed.append((_text(entry_id), _text(kind), orjson.loads(data)))
    return parsed


def record_run(pipe: Any, settings: Settings, run_ms: int, images: int) -> None:
    """A finished run's time per image (claim to upload), for the ETA of what waits."""
    key = recent_key(settings, settings.model_id)
    pipe.lpush(key, round(run_ms / max(images, 1)))
    pipe.ltrim(key, 0, RECENT_RUNS - 1)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
