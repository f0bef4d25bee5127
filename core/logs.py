"""Logs: one JSON object per line (structlog), or readable lines for a person (`KLEIN_LOG_FORMAT=console`,
which `klein up` sets).

Every line carries what is bound in its context: the API binds `request_id` (taken from `X-Request-ID` or
made, and returned in it), `tenant_id`, `prediction_id` and `dialect`; a worker binds `prediction_id` and
`tenant_id` for the prediction it runs. The code logs through the standard `logging` module; structlog
formats those records too. API keys (`kl_…`) and URL signatures are masked in every line, whatever logged
them (uvicorn's access log included); prompts are logged only at debug level.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

# The ASGI scope of the request being served: its route (and so its dialect) is known only after routing.
current_scope: ContextVar[MutableMapping[str, Any] | None] = ContextVar("current_scope", default=None)
_SECRETS = re.compile(r"(kl_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+|(signature=)[0-9a-f]+|(whsec_)[A-Za-z0-9+/=]+")


def _mask(match: re.Match[str]) -> str:
    return f"{next(group for group in match.groups() if group)}…"


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and ("kl_" in value or "signature=" in value or "whsec_" in value):
            event[key] = _SECRETS.sub(_mask, value)
    return event


def _dialect(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    scope = current_scope.get()
    route = scope.get("route") if scope is not None else None
    tags = getattr(route, "tags", None)
    if tags:
        event.setdefault("dialect", tags[0])
    return event


def configure(log_format: str = "json", level: str = "INFO") -> None:
    """Route every `logging` record (ours, uvicorn's, Celery's) through structlog to stderr."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _dialect,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if log_format == "json" else structlog.processors.StackInfoRenderer(),
        _redact,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if log_format == "json" else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker"):
        logger = logging.getLogger(name)
        logger.handlers.clear()  # theirs would print a second, unformatted copy
        logger.propagate = True


def bind(**fields: Any) -> None:
    structlog.contextvars.bind_contextvars(**fields)


def clear() -> None:
    structlog.contextvars.clear_contextvars()
