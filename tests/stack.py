"""Provisioning of the machine's PostgreSQL for one test session (a fresh database each run)."""

from __future__ import annotations

import os

import psycopg

PG_ADMIN_URL = os.environ.get("KLEIN_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("KLEIN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
