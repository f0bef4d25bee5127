"""`klein`: operator commands.

klein migrate                      apply database migrations (alembic upgrade head)
klein create-tenant NAME           create a tenant and print its first API key
klein create-key TENANT_NAME       issue another key for a tenant
klein build-tiny DIR               save the tiny random-weights Klein pipeline to DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent


def migrate() -> None:
    from alembic import command
    from alembic.config import Config

    command.upgrade(Config(toml_file=str(ROOT / "pyproject.toml")), "head")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["up"]:
        from core.up import up

        return up(argv[1:])
    parser = argparse.ArgumentParser(prog="klein", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the whole platform on embedded services")
    sub.add_parser("migrate", help="apply database migrations")
    tenant = sub.add_parser("create-tenant", help="create a tenant and print its first API key")
    tenant.add_argument("name")
    key = sub.add_parser("create-key", help="issue another API key for a tenant")
    key.add_argument("tenant_name")
    key.add_argument("--name", default="")
    tiny = sub.add_parser("build-tiny", help="save the tiny random-weights pipeline")
    tiny.add_argument("directory", type=Path)
    args = parser.parse_args(argv)

    if args.command == "migrate":
        migrate()
    elif args.command in ("create-tenant", "create-key"):
        from core.db import make_sync_engine
        from core.tenants import create_tenant, find_tenant, issue_key

        engine = make_sync_engine(get_settings())
        with engine.begin() as conn:
            if args.command == "create-tenant":
                if find_tenant(conn, args.name):
                    print(f"tenant {args.name!r} exists already", file=sys.stderr)
                    return 1
                issued = issue_key(conn, create_tenant(conn, args.name), "default")
            else:
                tenant_id = find_tenant(conn, args.tenant_name)
                if tenant_id is None:
                    print(f"no tenant named {args.tenant_name!r}", file=sys.stderr)
                    return 1
                issued = issue_key(conn, tenant_id, args.name)
        print(f"tenant: {issued.tenant_id}\nkey:    {issued.key}  (shown once; only its hash is stored)")
    elif args.command == "build-tiny":
        from models.tiny import save_tiny_pipeline

        print(save_tiny_pipeline(args.directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
