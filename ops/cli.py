"""`klein`: operator commands.

    klein up [--model PATH] [--tls-cert PATH --tls-key PATH]
                                             start the whole platform on embedded services (ops/up.py)
    klein migrate                            apply database migrations (alembic upgrade head)
    klein create-tenant NAME [limits]        create a tenant and print its first API key (shown once)
    klein set-limits TENANT [limits]         change a tenant's limits or price plan
    klein tenants                            list tenants with their limits
    klein create-key TENANT [--name N] [--expires-in-days D]
    klein keys TENANT                        list a tenant's keys (prefix, name, created, last used)
    klein revoke-key KEY_ID                  revoke a key, effective on its next request
    klein usage [--tenant T] [--start D] [--end D]
    klein build-tiny DIR                     save the tiny random-weights Klein pipeline to DIR
    klein workers                            list the GPU workers: model, Celery node, state, last seen
    klein drain-worker NAME                  drain a GPU worker (Celery node name or id): no new work

Operator actions, through the admin API (KLEIN_ADMIN_URL, KLEIN_ADMIN_API_KEY; ops/actions.py):
    klein prediction ID | cancel ID | delete ID
    klein requeue [ID] [--tenant T] [--model M] [--failed-since TIME] [--limit N]
    klein suspend TENANT | resume TENANT
    klein deliveries [--tenant T] [--status S] [--receiver HOST] [--limit N]
    klein replay DELIVERY_ID | replay --tenant T [--status failed|gone] [--limit N]
    klein build-tiny-safety DIR [--kind K]   save a test safety classifier (random, nsfw, normal, bright, vit-base)

TENANT is a tenant's name or id; limits are --rate-limit N (requests per minute per key),
--tenant-rate-limit N (per minute, all keys together; default: the per-key limit),
--max-in-flight N (queued + processing), --price P (USD per image) and --retention-days D (how long
outputs and references are kept after a prediction finishes, e.g. 30 or 0.5; 0 keeps nothing after a
synchronous answer delivered them; docs/retention.md); "default" resets one. Safety: --safety-policy
block|blur|flag, --allow-disable-safety-checker yes|no, --blocked-terms-file FILE (docs/safety.md). Result
cache: --cache-price P (USD per image answered from it), --result-cache yes|no (docs/cache.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from core.settings import get_settings
from ops import actions
from ops.migrate import migrate


def _limit(value: str) -> int | float | None:
    return None if value == "default" else (float(value) if "." in value else int(value))


def _retention_days(value: str) -> int | None:
    """Days as seconds, the column's unit."""
    from core.tenants import MAX_RETENTION_S

    if value == "default":
        return None
    try:
        seconds = round(float(value) * 86400)
    except (ValueError, OverflowError):  # not a number, nan, inf
        raise argparse.ArgumentTypeError(f"not a number of days: {value!r}") from None
    if not 0 <= seconds <= MAX_RETENTION_S:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_RETENTION_S // 86400} days")
    return seconds


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate-limit", dest="rate_limit_per_minute", type=_limit, default=argparse.SUPPRESS)
    parser.add_argument(
        "--tenant-rate-limit", dest="tenant_rate_limit_per_minute", type=_limit, default=argparse.SUPPRESS
    )
    parser.add_argument("--max-in-flight", dest="max_in_flight", type=_limit, default=argparse.SUPPRESS)
    parser.add_argument("--price", dest="price_per_image", type=_limit, default=argparse.SUPPRESS)
    parser.add_argument(  # docs/enhancer.md
        "--enhancement-price", dest="price_per_enhancement", type=_limit, default=argparse.SUPPRESS
    )
    parser.add_argument("--batch-price", dest="batch_price_per_image", type=_limit, default=argparse.SUPPRESS)
    parser.add_argument(
        "--retention-days", dest="retention_s", metavar="DAYS", type=_retention_days, default=argparse.SUPPRESS
    )
    cache = parser.add_argument_group("result cache (docs/cache.md)")
    cache.add_argument("--cache-price", dest="cache_price_per_image", type=_limit, default=argparse.SUPPRESS)
    cache.add_argument(
        "--result-cache", dest="result_cache", type=_yes_no, metavar="yes|no|default", default=argparse.SUPPRESS
    )
    _add_safety(parser)


def _add_safety(parser: argparse.ArgumentParser) -> None:
    """The tenant's safety settings (docs/safety.md); "default" resets one."""
    policy = parser.add_argument_group("safety (docs/safety.md)")
    policy.add_argument(
        "--safety-policy", dest="safety_policy", choices=("block", "blur", "flag", "default"), default=argparse.SUPPRESS
    )
    policy.add_argument(
        "--allow-disable-safety-checker",
        dest="allow_disable_safety_checker",
        type=_yes_no,
        metavar="yes|no|default",
        default=argparse.SUPPRESS,
    )
    policy.add_argument(
        "--blocked-terms-file",
        dest="blocked_terms",
        metavar="FILE",
        type=_terms_file,
        default=argparse.SUPPRESS,
        help="the tenant's own blocked terms, one a line (replaces its list; 'default' clears it)",
    )


def _yes_no(value: str) -> bool | None:
    if value not in ("yes", "no", "default"):
        raise argparse.ArgumentTypeError("yes, no or default")
    return None if value == "default" else value == "yes"


def _terms_file(value: str) -> list[str] | None:
    from core.prompt_policy import read_terms

    return None if value == "default" else list(read_terms(value))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klein", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the whole platform on embedded services")
    sub.add_parser("migrate", help="apply database migrations")
    create = sub.add_parser("create-tenant", help="create a tenant and print its first API key")
    create.add_argument("name")
    _add_limits(create)
    limits = sub.add_parser("set-limits", help="change a tenant's limits or price plan")
    limits.add_argument("tenant")
    _add_limits(limits)
    sub.add_parser("tenants", help="list tenants")
    key = sub.add_parser("create-key", help="issue another API key for a tenant")
    key.add_argument("tenant")
    key.add_argument("--name", default="")
    key.add_argument("--expires-in-days", type=float)
    keys = sub.add_parser("keys", help="list a tenant's keys")
    keys.add_argument("tenant")
    revoke = sub.add_parser("revoke-key", help="revoke a key by id")
    revoke.add_argument("key_id")
    report = sub.add_parser("usage", help="usage totals by day and model")
    report.add_argument("--tenant")
    report.add_argument("--start", type=date.fromisoformat)
    report.add_argument("--end", type=date.fromisoformat)
    tiny = sub.add_parser("build-tiny", help="save the tiny random-weights pipeline")
    tiny.add_argument("directory", type=Path)
    sub.add_parser("workers", help="list the GPU workers")
    drain = sub.add_parser("drain-worker", help="drain a GPU worker: it finishes what it holds, takes nothing new")
    drain.add_argument("name", help="its Celery node name (as `celery inspect` shows it) or worker id")
    actions.add_commands(sub)
    checker = sub.add_parser("build-tiny-safety", help="save a test image classifier for the safety checker")
    checker.add_argument("directory", type=Path)
    checker.add_argument("--kind", choices=("random", "nsfw", "normal", "bright", "vit-base"), default="random")
    return parser


def _print(rows: Any) -> None:
    print(json.dumps([dict(row) for row in rows], default=str, indent=2))


def _keys_changed() -> None:
    """Tell every API replica to drop its cached key lookups (see api/services/principals.py)."""
    import redis

    from core.redis_connection import sync_client

    settings = get_settings()
    try:
        sync_client(settings).publish(settings.keys_channel, "changed")
    except redis.RedisError:
        print(f"note: Redis unreachable; API replicas notice within {settings.key_cache_ttl_s:g} s", file=sys.stderr)


def _admin(args: argparse.Namespace) -> int:
    from sqlalchemy import Connection

    from core import tenants, usage
    from core.db import make_sync_engine

    limits = {k: getattr(args, k) for k in tenants.LIMIT_FIELDS if hasattr(args, k)}
    if limits.get("safety_policy") == "default":
        limits["safety_policy"] = None

    def tenant_id(conn: Connection, name_or_id: str) -> str:
        found = conn.execute(tenants.find_tenant(name_or_id)).first()
        if found is None:
            raise SystemExit(f"no tenant {name_or_id!r}")
        return str(found.id)

    engine = make_sync_engine(get_settings())
    with engine.begin() as conn:
        if args.command == "create-tenant":
            if conn.execute(tenants.find_tenant(args.name)).first() is not None:
                raise SystemExit(f"tenant {args.name!r} exists already")
            new_id, statement = tenants.create_tenant(args.name, **limits)
            conn.execute(statement)
            issued, statement = tenants.issue_key(new_id, "default")
            conn.execute(statement)
            print(f"tenant: {new_id}\nkey:    {issued.key}  (shown once; only its hash is stored)")
        elif args.command == "set-limits":
            _print(conn.execute(tenants.set_limits(tenant_id(conn, args.tenant), **limits)).mappings())
            _keys_changed()
        elif args.command == "tenants":
            _print(conn.execute(tenants.list_tenants()).mappings())
        elif args.command == "create-key":
            expires = datetime.now(UTC) + timedelta(days=args.expires_in_days) if args.expires_in_days else None
            issued, statement = tenants.issue_key(tenant_id(conn, args.tenant), args.name, expires)
            conn.execute(statement)
            print(f"key id: {issued.key_id}\nkey:    {issued.key}  (shown once; only its hash is stored)")
        elif args.command == "keys":
            _print(conn.execute(tenants.list_keys(tenant_id(conn, args.tenant))).mappings())
        elif args.command == "revoke-key":
            if conn.execute(tenants.revoke_key(args.key_id)).first() is None:
                raise SystemExit(f"no active key {args.key_id!r}")
            _keys_changed()
            print(f"revoked {args.key_id}")
        elif args.command == "usage":
            end = args.end or datetime.now(UTC).date() + timedelta(days=1)
            start = args.start or end - timedelta(days=31)
            scope = tenant_id(conn, args.tenant) if args.tenant else None
            _print(conn.execute(usage.totals(scope, start, end)).mappings())
    engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["up"]:
        from ops.up import up

        return up(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "migrate":
        migrate()
    elif args.command in actions.COMMANDS:
        return actions.run(args, get_settings())
    elif args.command == "build-tiny":
        from models.tiny import save_tiny_pipeline

        print(save_tiny_pipeline(args.directory))
    elif args.command in ("workers", "drain-worker"):
        from ops import workers

        return workers.list_workers() if args.command == "workers" else workers.drain(args.name)
    elif args.command == "build-tiny-safety":
        from models.tiny_safety import save

        print(save(args.directory, args.kind))
    else:
        return _admin(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
