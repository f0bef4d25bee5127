"""The batch feeder and a batch's end on the real database (core/batches.py): the depth, the tenants' fair share
of idle GPUs, the batch class kept apart from interactive micro-batches, the counts when a batch ends. On a database
of its own: the session's worker (its sweeper feeds batches) never sees these."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from core import batches, lifecycle, quota
from core.db import make_sync_engine
from core.ids import new_id
from core.queue import BATCH_PRIORITY
from core.settings import Settings
from core.tables import batch_requests, predictions
from core.tables import batches as batch_table
from models.klein import KleinInput
from ops.migrate import migrate
from tests.conftest import make_tenant
from tests.integration.test_lifecycle import insert_queued
from tests.stack import create_database, drop_database

PARAMS = KleinInput(prompt="a cat").to_params(1).model_dump(mode="json")


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    name = f"klein_batches_{secrets.token_hex(4)}"
    settings = Settings(database_url=create_database(name))
    migrate(settings.sync_database_url)
    own = make_sync_engine(settings)
    yield own
    own.dispose()
    drop_database(name)


def new_batch(engine: Engine, tenant_id: str, lines: int, refused: int = 0) -> str:
    batch_id = new_id()
    with engine.begin() as conn:
        conn.execute(
            insert(batch_table).values(
                id=batch_id,
                tenant_id=tenant_id,
                dialect="openai",
                endpoint="/v1/images/generations",
                completion_window="24h",
                total=lines + refused,
                expires_at=func.now() + timedelta(hours=24),
            )
        )
        rows: list[dict[str, Any]] = [
            {"batch_id": batch_id, "line": i + 1, "custom_id": f"l{i}", "model": "flux-klein-4b", "params": PARAMS}
            | {"error": None}
            for i in range(lines)
        ]
        rows += [
            {"batch_id": batch_id, "line": lines + i + 1, "custom_id": f"bad{i}", "model": None, "params": None}
            | {"error": {"message": "no"}}
            for i in range(refused)
        ]
        if rows:
            conn.execute(insert(batch_requests), rows)
    return batch_id


def fed(engine: Engine, settings: Settings) -> list[batches.Fed]:
    with engine.begin() as conn:
        return batches.feed(conn, settings)


def end_all_queued(engine: Engine, batch_ids: list[str]) -> None:
    """What a worker would do to the fed predictions: claim and complete them."""
    with engine.begin() as conn:
        ids = conn.execute(select(predictions.c.id).where(predictions.c.batch_id.in_(batch_ids))).scalars().all()
        for prediction_id in ids:
            if conn.execute(lifecycle.claim(prediction_id, "w", 60, 3)).first() is not None:
                conn.execute(lifecycle.complete(prediction_id, "w", [], {}))


def test_the_feeder_keeps_the_depth_and_shares_it_among_tenants(engine: Engine) -> None:
    settings = Settings(batch_feed_depth=4)
    big, small = make_tenant(engine), make_tenant(engine)
    big_batch = new_batch(engine, big.tenant_id, 6)
    small_batch = new_batch(engine, small.tenant_id, 2, refused=1)

    first = fed(engine, settings)
    assert Counter(one.tenant_id for one in first) == {big.tenant_id: 2, small.tenant_id: 2}  # not 4 of the oldest
    assert {one.priority for one in first} == {BATCH_PRIORITY}
    assert fed(engine, settings) == []  # the depth is full
    with engine.connect() as conn:
        rows = conn.execute(select(predictions).where(predictions.c.id.in_([one.prediction_id for one in first])))
        assert {(row.status, row.batch_id is not None, row.params["seed"]) for row in rows} == {("created", True, 1)}

    end_all_queued(engine, [big_batch, small_batch])
    second = fed(engine, settings)  # the small batch has nothing left to feed: the big one takes the room
    assert Counter(one.tenant_id for one in second) == {big.tenant_id: 4}
    end_all_queued(engine, [big_batch])
    with engine.begin() as conn:
        assert batches.finalize(conn, settings, small_batch) == []
        assert batches.finalize(conn, settings, big_batch) == []  # ended, no webhook
        ended = {
            row.id: row
            for row in conn.execute(select(batch_table).where(batch_table.c.id.in_([big_batch, small_batch])))
        }
    assert (ended[small_batch].status, ended[small_batch].completed, ended[small_batch].failed) == ("completed", 2, 1)
    assert ended[small_batch].output_file_id and ended[small_batch].error_file_id
    assert (ended[big_batch].status, ended[big_batch].completed, ended[big_batch].failed) == ("completed", 6, 0)
    assert ended[big_batch].error_file_id is None


def test_a_batch_expires_its_unstarted_lines_and_keeps_what_finished(engine: Engine) -> None:
    settings = Settings(batch_feed_depth=2)
    tenant = make_tenant(engine)
    batch_id = new_batch(engine, tenant.tenant_id, 5)
    first = fed(engine, settings)
    with engine.begin() as conn:  # one runs to the end, one is running
        done, running = first[0].prediction_id, first[1].prediction_id
        conn.execute(lifecycle.claim(done, "w", 60, 3))
        conn.execute(lifecycle.complete(done, "w", [], {}))
        conn.execute(lifecycle.claim(running, "w", 60, 3))
    queued = fed(engine, settings)  # the depth counts what waits: two more
    assert len(queued) == 2
    with engine.begin() as conn:
        conn.execute(update(batch_table).where(batch_table.c.id == batch_id).values(expires_at=func.now()))
        canceled = batches.expire(conn)  # the queued ones are canceled, the fifth line never fed
        assert sorted(canceled) == sorted((one.prediction_id, tenant.tenant_id) for one in queued)
        assert batches.finalize(conn, settings, batch_id) == []
        assert conn.execute(select(batch_table.c.status).where(batch_table.c.id == batch_id)).scalar() == "in_progress"
        conn.execute(lifecycle.complete(running, "w", [], {}))  # what ran finishes
        batches.finalize(conn, settings, batch_id)
        row = conn.execute(select(batch_table).where(batch_table.c.id == batch_id)).one()
    assert fed(engine, settings) == []  # an expired batch feeds nothing more
    assert (row.status, row.completed, row.failed) == ("expired", 2, 3) and row.expired_at is not None


def test_a_batch_prediction_never_joins_an_interactive_micro_batch(engine: Engine) -> None:
    tenant = make_tenant(engine)
    model = f"batch-class-{new_id()[:6]}"
    head, interactive = insert_queued(engine, tenant, model, PARAMS, 0), insert_queued(engine, tenant, model, PARAMS, 0)
    batch_id = new_batch(engine, tenant.tenant_id, 0)
    batch_work = insert_queued(engine, tenant, model, PARAMS, BATCH_PRIORITY)
    other_batch_work = insert_queued(engine, tenant, model, PARAMS, BATCH_PRIORITY)
    with engine.begin() as conn:
        conn.execute(
            update(predictions).where(predictions.c.id.in_([batch_work, other_batch_work])).values(batch_id=batch_id)
        )

    def candidates(exclude: str, batch: bool) -> set[str]:
        with engine.connect() as conn:
            look = lifecycle.batch_candidates(model, PARAMS, exclude, 3, 8, batch_work=batch)
            return {row.id for row in conn.execute(look)}

    assert candidates(head, batch=False) == {interactive}
    assert candidates(batch_work, batch=True) == {other_batch_work}
    with engine.begin() as conn:  # this test's rows out of the other tests' depth
        batches.cancel_queued(conn, [batch_id])


def test_a_batch_near_the_end_of_its_window_queues_as_the_lowest_interactive_class(engine: Engine) -> None:
    """So that it still finishes in time: behind every tenant with a smaller backlog, no longer behind all of them."""
    settings = Settings(batch_feed_depth=1, batch_urgent_s=3600)
    tenant = make_tenant(engine)
    batch_id = new_batch(engine, tenant.tenant_id, 2)
    with engine.begin() as conn:
        soon = func.now() + timedelta(minutes=30)
        conn.execute(update(batch_table).where(batch_table.c.id == batch_id).values(expires_at=soon))
    (urgent,) = fed(engine, settings)
    assert urgent.priority == quota.LOWEST_PRIORITY < BATCH_PRIORITY
    with engine.begin() as conn:  # this test's rows out of the next tests' depth
        conn.execute(update(batch_table).where(batch_table.c.id == batch_id).values(status="cancelling"))
        batches.cancel_queued(conn, [batch_id])
