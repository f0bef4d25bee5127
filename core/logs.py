"""Logs: one JSON object per line (structlog), or readable lines for a person (`KLEIN_LOG_FORMAT=console`,
which `klein up` sets).

Every line carries what is bound in its context: the API binds `request_id` (taken from `X-Request-ID` or
made, and returned in it), `tenant_id`, `prediction_id` and `dialect`; a worker binds `prediction_id`,
`tenant_id` and the submit's `request_id` for the prediction it runs; with tracing on (core/tracing.py), a line
logged inside a span carries its `trace_id` and `span_id`. Python's warnings are logged too (captureWarnings).
The code logs through the standard `logging` module; structlog formats those records too. Credentials (API keys,
`Authorization` values, webhook secrets and signatures, URL signatures, the process's own secrets) are masked in
every rendered line, whatever logged them and however deep in its fields (uvicorn's and Celery's records
included); tracebacks never show locals; prompts are logged only at debug level.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

from core import tracing

# The ASGI scope of the request being served: its route (and so its dialect) is known only after routing.
current_scope: ContextVar[MutableMapping[str, Any] | None] = ContextVar("current_scope", default=None)

# Names whose value is a credential, as headers, fields or settings: their value is masked wherever it follows.
_SECRET_NAMES = (
    r"apikey|api[-_]key|x-api-key|x-key|x-admin-key|authorization|proxy-authorization|cookie|webhook[-_]secret"
    r"|webhook-signature|admin[-_]api[-_]key|metrics[-_]token|url[-_]signing[-_]key|password|secret[-_]access[-_]key"
)
_ANSI = r"(?:\x1b\[[0-9;]*m)*"  # the console renderer's colours, on a terminal
_SECRETS = (
    r"(kl_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+"  # our API keys: the first 8 characters stay, to tell keys apart
    r"|(signature=)[^&\s'\"]+"  # signed links
    r"|(whsec_)[A-Za-z0-9+/=]+"  # webhook secrets
    r"|(v1,)[A-Za-z0-9+/]{20,}={0,2}"  # Standard Webhooks signatures
    r"|(\b(?:Bearer|Basic|Token|Key)\s+)[A-Za-z0-9._~+/:=-]{16,}"  # Authorization schemes
    r"|(://[^:/@\s'\"]+:)[^@\s'\"]+(?=@)"  # a password in a URL (database, Redis)
    rf"|((?i:{_SECRET_NAMES}){_ANSI}\\?['\"]?\s*[:=,]\s*{_ANSI}b?\\?['\"]?(?:(?:Bearer|Basic|Token|Key)\s+|v1,)?)"
    r"[^'\"\s,;)}\]\\\x1b]+"  # a value after its name: `apikey: …`, `(b'x-admin-key', b'…')`, `"password": "…"`
)

# How each kind of match starts, in lower case: searched for in the line's lower-case copy, a superset of the
# matches' starts (a case-insensitive pattern would take as long as the full one).
_STARTS = rf"kl_|signature=|whsec_|v1,|(?:bearer|basic|token|key)\s|://|{_SECRET_NAMES}"


class Redactor:
    """Masks credentials in a rendered line, whatever shape carried them (a message, a nested field, bytes, an
    exception's text): the known kinds by their look, any value after a credential's name, and the values of
    this process's own secrets (`secrets`: its settings' admin key, metrics token, …)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        exact = "|".join(f"({re.escape(value)})" for value in sorted(set(secrets), key=len, reverse=True) if value)
        self.pattern = re.compile(_SECRETS + (f"|{exact}" if exact else ""))
        self.named_groups = re.compile(_SECRETS).groups  # the exact values' groups come after these
        # Most lines hold nothing to mask: finding no match's start in them takes a tenth of the full pattern's
        # time, which a line per request would pay.
        self.starts = re.compile(_STARTS + (f"|{exact.lower()}" if exact else ""))

    def _mask(self, match: re.Match[str]) -> str:
        index = next(i for i, group in enumerate(match.groups()) if group is not None)
        return "…" if index >= self.named_groups else f"{match.group(index + 1)}…"

    def __call__(self, _: Any, __: str, line: Any) -> str:  # after the renderer: `line` is its text
        text = str(line)
        return self.pattern.sub(self._mask, text) if self.starts.search(text.lower()) else text


def _dialect(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    scope = current_scope.get()
    route = scope.get("route") if scope is not None else None
    tags = getattr(route, "tags", None)
    if tags:
        event.setdefault("dialect", tags[0])
    return event


def _trace(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if tracing.enabled:
        ids = tracing.current_ids()
        if ids is not None:
            event.setdefault("trace_id", ids[0])
            event.setdefault("span_id", ids[1])
    return event


# Lines these libraries write once per request or task, which ours replace (the API's access line, the
# workers' line per prediction and per webhook attempt; httpx's names the whole URL fetched or posted to):
# shown at DEBUG only.
_REPLACED = ("uvicorn.access", "celery.app.trace", "celery.worker.strategy", "httpx")


def configure(log_format: str = "json", level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Route every `logging` record (ours, uvicorn's, Celery's) through structlog to stderr, credentials masked
    (`Redactor`; `secrets`: this process's own, e.g. Settings.secret_values()).

    Exceptions are rendered as plain tracebacks in both formats, never with their frames' locals (a request's
    headers are among them): a few kilobytes and milliseconds per error."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _dialect,
        _trace,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
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
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer, Redactor(secrets)],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker"):
        logger = logging.getLogger(name)
        logger.handlers.clear()  # theirs would print a second, unformatted copy
        logger.propagate = True
    for name in _REPLACED:
        logging.getLogger(name).setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)  # `warnings` output as log lines (py.warnings), not bare stderr text


def bind(**fields: Any) -> None:
    structlog.contextvars.bind_contextvars(**fields)


def unbind(*names: str) -> None:
    structlog.contextvars.unbind_contextvars(*names)


def current(name: str) -> Any:
    """A field bound in this context (e.g. `request_id`), or None."""
    return structlog.contextvars.get_contextvars().get(name)


def clear() -> None:
    structlog.contextvars.clear_contextvars()
