"""The `klein` CLI's operator actions: each calls the admin API (KLEIN_ADMIN_URL, with KLEIN_ADMIN_API_KEY), so
that a cancel, a requeue or a replay takes the one code path the API takes (its slots, queue, events and storage),
and a suspension reaches every API replica's key cache at once. docs/operations.md, "Operator actions"."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

import httpx

from core.settings import Settings

COMMANDS = ("prediction", "cancel", "delete", "requeue", "suspend", "resume", "deliveries", "replay")


def add_commands(sub: Any) -> None:
    """The actions' subcommands, on `klein`'s parser."""
    one = sub.add_parser("prediction", help="any tenant's prediction by id")
    one.add_argument("prediction_id")
    sub.add_parser("cancel", help="cancel a queued or running prediction").add_argument("prediction_id")
    sub.add_parser("delete", help="cancel if unfinished, delete outputs and references").add_argument("prediction_id")
    requeue = sub.add_parser("requeue", help="run failed predictions again: one by id, or a filtered set")
    requeue.add_argument("prediction_id", nargs="?")
    requeue.add_argument("--tenant")
    requeue.add_argument("--model")
    requeue.add_argument("--failed-since", help="ISO 8601 time, e.g. 2026-12-07T20:00:00Z")
    requeue.add_argument("--limit", type=int, default=100)
    sub.add_parser("suspend", help="refuse a tenant's submits (403)").add_argument("tenant")
    sub.add_parser("resume", help="accept a suspended tenant's submits again").add_argument("tenant")
    listed = sub.add_parser("deliveries", help="webhook deliveries across tenants, newest first")
    listed.add_argument("--tenant")
    listed.add_argument("--status", choices=("pending", "sending", "delivered", "failed", "gone"))
    listed.add_argument("--receiver", help="a receiver host, as the backlog metric names it")
    listed.add_argument("--limit", type=int, default=50)
    replay = sub.add_parser("replay", help="send a webhook delivery again, or a tenant's failed ones")
    replay.add_argument("delivery_id", nargs="?")
    replay.add_argument("--tenant", help="replay this tenant's failed deliveries (--status gone: its gone ones)")
    replay.add_argument("--status", choices=("failed", "gone"), default="failed")
    replay.add_argument("--limit", type=int, default=100)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if settings.admin_api_key is None:
        raise SystemExit("set KLEIN_ADMIN_API_KEY (and KLEIN_ADMIN_URL, default http://127.0.0.1:8000)")
    headers = {"X-Admin-Key": settings.admin_api_key.get_secret_value()}
    with httpx.Client(base_url=f"{settings.admin_url.rstrip('/')}/admin/v1", headers=headers, timeout=60) as api:
        method, path, options = _request(args)
        try:
            answer = api.request(method, path, **options)
        except httpx.HTTPError as exc:
            raise SystemExit(f"the admin API at {settings.admin_url} did not answer: {exc}") from None
    if answer.status_code >= 400:
        is_json = answer.headers.get("content-type", "").startswith("application/json")
        raise SystemExit(f"{answer.status_code}: {answer.json().get('error') if is_json else answer.text[:200]}")
    print(json.dumps(answer.json(), indent=2) if answer.content else f"{args.command}: done")
    return 0


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """The admin API call behind the command: method, path and httpx options."""
    command = args.command
    prediction = f"/predictions/{quote(getattr(args, 'prediction_id', None) or '', safe='')}"
    if command == "prediction":
        return "GET", prediction, {}
    if command == "cancel":
        return "POST", f"{prediction}/cancel", {}
    if command == "delete":
        return "DELETE", prediction, {}
    if command == "requeue":
        if args.prediction_id:
            return "POST", f"{prediction}/requeue", {}
        filters = {"tenant_id": args.tenant, "model": args.model, "failed_since": args.failed_since}
        body = {name: value for name, value in filters.items() if value is not None} | {"limit": args.limit}
        return "POST", "/predictions/requeue", {"json": body}
    if command in ("suspend", "resume"):
        return "POST", f"/tenants/{quote(args.tenant, safe='')}/{command}", {}
    if command == "deliveries":
        filters = {"tenant_id": args.tenant, "status": args.status, "receiver": args.receiver, "limit": args.limit}
        return "GET", "/webhooks/deliveries", {"params": {k: v for k, v in filters.items() if v is not None}}
    if args.delivery_id:
        return "POST", f"/webhooks/deliveries/{quote(args.delivery_id, safe='')}/replay", {}
    if not args.tenant:
        raise SystemExit("replay: name a delivery id, or --tenant to replay a tenant's failed deliveries")
    body = {"tenant_id": args.tenant, "status": args.status, "limit": args.limit}
    return "POST", "/webhooks/deliveries/replay", {"json": body}
