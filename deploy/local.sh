#!/usr/bin/env bash
# The README's commands, on a fresh machine with Python 3.11+:
#   bash deploy/local.sh up      install, then start the whole platform on embedded services (Ctrl-C stops it)
#   bash deploy/local.sh test    install, then lint, type-check and run the test suite on real services; without
#                                arguments, the end-to-end tests once more through PgBouncer (tests/pgbouncer.py)
#   bash deploy/local.sh quick   install, then the unit tier only (tests/unit: no services)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}  # the CPU build here; on GPU machines install your CUDA build first
WORKERS=${KLEIN_TEST_WORKERS:-2}  # test sessions at once (pytest-xdist): one per core here

setup() {
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  local stamp
  stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    # pip's detail goes to a log; its last lines are shown if it fails.
    local log=.venv/install.log started=$SECONDS
    echo -n "installing dependencies (a few minutes the first time; detail in $log) … "
    if ! {
      .venv/bin/python -m pip install -q --upgrade pip &&
        { .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"; } &&
        .venv/bin/python -m pip install -q -e ".[worker,local,dev]"
    } >"$log" 2>&1; then
      echo "failed"; tail -n 30 "$log"; echo "the whole log: $log" >&2
      return 1
    fi
    echo "$((SECONDS - started)) s"
    touch "$stamp"
  fi
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The tests use the machine's PostgreSQL (trust auth, user postgres) and Redis; start them if they are down.
ensure_services() {
  if ! listening 5432; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  fi
  if ! listening 6379; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
  # The second test pass runs through PgBouncer (a subprocess per session); Debian's is 1.18.
  if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ] && command -v apt-get >/dev/null; then
    echo "installing pgbouncer"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq pgbouncer >/dev/null || { apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null; }
  fi
  # tests/e2e/test_web.py drives the web pages in Debian's headless Chromium (Playwright cannot download its own).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    echo "installing chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium chromium-driver >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
  fi
  # tests/deploy renders the Kubernetes overlays with kubectl's own kustomize (offline).
  if ! command -v kubectl >/dev/null && command -v apt-get >/dev/null; then
    echo "installing kubectl"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubectl >/dev/null; }
  fi
  # tests/deploy/test_alert_rules.py runs the alert rules' scenarios with promtool (Debian's prometheus package).
  if ! command -v promtool >/dev/null && command -v apt-get >/dev/null; then
    echo "installing promtool (prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }
  fi
  # tests/e2e/test_replicas.py puts two API replicas behind the shipped deploy/proxy/ configs.
  if { [ ! -x /usr/sbin/haproxy ] || [ ! -x /usr/sbin/nginx ]; } && command -v apt-get >/dev/null; then
    echo "installing haproxy and nginx"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq haproxy nginx-light >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy nginx-light >/dev/null; }
  fi
  # tests/e2e/test_web.py runs the API tab's JavaScript snippets with Node (the Replicate one with its npm package).
  if ! command -v npm >/dev/null && command -v apt-get >/dev/null; then
    echo "installing nodejs and npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq nodejs npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
  fi
  for _ in $(seq 50); do listening 5432 && listening 6379 && return 0; sleep 0.2; done
  echo "PostgreSQL or Redis did not come up" >&2
  return 1
}

case "${1:-}" in
  up)
    shift
    setup
    exec .venv/bin/klein up "$@"
    ;;
  test)
    shift
    setup
    ensure_services
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
    if [ $# -gt 0 ]; then
      .venv/bin/pytest "$@"
    else  # the whole suite, a file at a time on each of KLEIN_TEST_WORKERS sessions (each its own stack: tests/stack.py)
      .venv/bin/pytest -n "$WORKERS" --dist loadfile --durations=10
      # then the end-to-end tier through PgBouncer, transaction pooling
      # (submit, status, cancel, the worker, keys, admin, usage and the batched statements; not every e2e file)
      KLEIN_TEST_PGBOUNCER=1 .venv/bin/pytest -q -n "$WORKERS" --dist loadfile tests/e2e/test_predictions.py \
        tests/e2e/test_worker.py tests/e2e/test_tenancy.py tests/integration/test_pg.py
    fi
    ;;
  quick)  # the unit tier alone: no services, about half a minute
    shift
    setup
    .venv/bin/pytest -m unit -q "$@"
    ;;
  *)
    echo "usage: bash deploy/local.sh up|test|quick" >&2
    exit 2
    ;;
esac
