"""The completion event, published on `settings.events_channel` once a prediction's row is final.

Its data is the prediction's id, then, when a worker finished the prediction, a space and the final row
as JSON, less `input` and `params`: the API waiting on it holds those already and answers Try-Sync from
the event without reading the row back (docs/performance.md, figure 2). Other publishers (a cancel, the
sweeper) send the id alone, and waiters read the row.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import DateTime

from core.tables import predictions

# Never `webhook`: it may hold the client's own signing secret, and this row is published on Redis.
FINAL_COLUMNS = tuple(column for column in predictions.c if column.name not in ("input", "params", "webhook"))
_TIMES = tuple(column.name for column in FINAL_COLUMNS if isinstance(column.type, DateTime))


def completion(prediction_id: str, final_row: Mapping[Any, Any] | None = None) -> bytes:
    if final_row is None:
        return prediction_id.encode()
    # SQLAlchemy's column names are a str subclass, which orjson takes as keys only with this option.
    return prediction_id.encode() + b" " + orjson.dumps(dict(final_row), option=orjson.OPT_NON_STR_KEYS)


def parse(data: bytes) -> tuple[str, bytes]:
    """(prediction id, the encoded final row or b"")."""
    prediction_id, _, final_row = data.partition(b" ")
    return prediction_id.decode(), final_row


def final_row(encoded: bytes) -> dict[str, Any]:
    """The row as the API's own read gives it: JSON columns decoded, timestamps as datetimes in UTC."""
    row: dict[str, Any] = orjson.loads(encoded)
    for name in _TIMES:
        if row.get(name) is not None:
            row[name] = datetime.fromisoformat(row[name]).astimezone(UTC)
    return row
