"""The state machine's compare-and-set transitions, on the real PostgreSQL schema."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, Update, update

from core import lifecycle
from core.ids import new_id
from core.lifecycle import Status
from core.tables import predictions
from core.tenants import IssuedKey
from models.klein import KleinInput
from tests.conftest import make_tenant

TIMINGS = {"inference_ms": 1}


def created(engine: Engine, tenant: IssuedKey) -> str:
    prediction_id = new_id()
    inp = KleinInput(prompt="a cat")
    with engine.begin() as conn:
        conn.execute(
            lifecycle.create(
                prediction_id=prediction_id,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model="flux-klein-4b",
                input=inp.model_dump(),
                params=inp.to_params(1).model_dump(),
            )
        )
    return prediction_id


def run(engine: Engine, statement: Update) -> Any:
    with engine.begin() as conn:
        return conn.execute(statement).mappings().first()


def test_claim_is_exclusive_while_the_lease_lives(engine: Engine, tenant: IssuedKey) -> None:
    pid = created(engine, tenant)
    row = run(engine, lifecycle.claim(pid, "w1", 60, 3))
    assert row["status"] == Status.PROCESSING and row["attempts"] == 1 and row["started_at"] is not None
    assert run(engine, lifecycle.claim(pid, "w2", 60, 3)) is None  # duplicate delivery to a second worker
    assert run(engine, lifecycle.complete(pid, "w2", [], TIMINGS)) is None  # only the holder may finish
    done = run(engine, lifecycle.complete(pid, "w1", [{"filename": "output.jpg"}], TIMINGS))
    assert done["status"] == Status.COMPLETED and done["completed_at"] is not None
    assert run(engine, lifecycle.claim(pid, "w1", 60, 3)) is None  # redelivery after completion
    assert run(engine, lifecycle.fail(pid, "w1", "late", TIMINGS)) is None  # terminal stays terminal


def test_an_expired_lease_is_claimed_again(engine: Engine, tenant: IssuedKey) -> None:
    pid = created(engine, tenant)
    assert run(engine, lifecycle.claim(pid, "vanished", 0, 3)) is not None
    retaken = run(engine, lifecycle.claim(pid, "w2", 60, 3))
    assert retaken["worker_id"] == "w2" and retaken["attempts"] == 2
    assert run(engine, lifecycle.complete(pid, "vanished", [], TIMINGS)) is None
    assert run(engine, lifecycle.fail(pid, "w2", "RuntimeError: boom", TIMINGS))["status"] == Status.FAILED


def test_cancel_and_unclaimed_failure(
    engine: Engine,
    tenant: IssuedKey,
) -> None:
    pid = created(engine, tenant)
    assert run(engine, lifecycle.cancel(pid, "someone-else")) is None  # scoped to the owner
    assert run(engine, lifecycle.cancel(pid, tenant.tenant_id))["status"] == Status.CANCELED
    assert run(engine, lifecycle.claim(pid, "w1", 60, 3)) is None

    other = created(engine, tenant)
    assert run(engine, lifecycle.fail_unclaimed(other, "could not be queued")) is not None
    assert run(engine, lifecycle.fail_unclaimed(other, "twice")) is None


def test_terminal_set() -> None:
    assert {s for s in Status if s.terminal} == {Status.COMPLETED, Status.FAILED, Status.CANCELED}


def test_a_lapsed_lease_is_requeued_until_the_attempts_run_out(engine: Engine, tenant: IssuedKey) -> None:
    pid = created(engine, tenant)
    assert run(engine, lifecycle.claim(pid, "w1", 60, 2)) is not None
    assert run(engine, lifecycle.renew([pid], "w1", 60)) is not None
    assert run(engine, lifecycle.renew([pid], "w2", 60)) is None  # not w2's to renew
    assert run(engine, lifecycle.requeue_lapsed(pid)) is None  # the lease is alive
    assert run(engine, lifecycle.renew([pid], "w1", 0)) is not None  # w1 dies right after: the lease lapses
    assert run(engine, lifecycle.requeue_lapsed(pid)) is not None
    assert run(engine, lifecycle.renew([pid], "w1", 60)) is None  # w1's late heartbeat finds it gone
    assert run(engine, lifecycle.claim(pid, "w2", 0, 2))["attempts"] == 2
    assert run(engine, lifecycle.claim(pid, "w3", 60, 2)) is None  # no attempts left, even with a lapsed lease
    failed = run(engine, lifecycle.give_up(pid, "worker lost 2 times"))
    assert failed is not None and run(engine, lifecycle.requeue_lapsed(pid)) is None


def test_batch_candidates_are_the_compatible_queued_ones_in_the_queues_order(engine: Engine, tenant: IssuedKey) -> None:
    """Same model, size, steps, guidance and text length, no references; priority first, then age."""
    model = f"batch-test-{new_id()[:6]}"  # this test's rows only
    base = KleinInput(prompt="a cat").to_params(1).model_dump()

    def queued(priority: int, **changes: Any) -> str:
        return insert_queued(engine, tenant, model, base | changes, priority)

    claimed = queued(0)
    noisy_old, quiet_new = queued(9, seed=2), queued(0, seed=3, num_outputs=2, output_format="png")
    queued(0, width=512)  # another size
    queued(0, num_inference_steps=8)  # other steps
    queued(0, reference_keys=["t/ref.png"])  # an edit
    queued(0, guidance_scale=4.0)
    queued(0, loras=[{"sha256": "ab" * 32, "scale": 1.0}])  # other LoRAs
    running = queued(0)
    run(engine, lifecycle.claim(running, "w0", 60, 3))

    def candidates(limit: int) -> list[Any]:
        look = lifecycle.batch_candidates(model, base, claimed, 3, limit)
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(look)]

    assert candidates(8) == [(quiet_new, 2), (noisy_old, 1)]
    assert candidates(1) == [(quiet_new, 2)]
    taken = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    statement = lifecycle.claim_companions("w1", 60, 3)
    rows = taken.execute(statement, {"ids": [quiet_new, running]}).mappings().all()
    assert [r["id"] for r in rows] == [quiet_new] and rows[0]["worker_id"] == "w1"  # `running` is w0's
    taken.close()


def insert_queued(engine: Engine, tenant: IssuedKey, model: str, params: dict[str, Any], priority: int) -> str:
    """A queued prediction of the tenant with these parameters, in priority class `priority`."""
    pid = new_id()
    with engine.begin() as conn:
        conn.execute(
            lifecycle.create(
                prediction_id=pid,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model=model,
                input={},
                params=params,
            )
        )
        conn.execute(update(predictions).where(predictions.c.id == pid).values(priority=priority))
    return pid


def queued_with_loras(engine: Engine, tenant: IssuedKey, model: str, shas: list[str], **changes: Any) -> str:
    """A queued prediction of the tenant naming its copies of the LoRAs `shas` (scale 1 unless `scale`)."""
    scale, priority = changes.pop("scale", 1.0), changes.pop("priority", 9)
    loras = [{"tenant_id": tenant.tenant_id, "sha256": sha, "scale": scale} for sha in shas]
    params = KleinInput(prompt="a cat").to_params(1).model_dump() | {"loras": loras}
    return insert_queued(engine, tenant, model, params, priority)


def next_with_loras(engine: Engine, model: str, tenant: IssuedKey, shas: list[str]) -> Any:
    with engine.connect() as conn:
        return conn.execute(lifecycle.next_with_loras(model, tenant.tenant_id, shas, 3)).scalar()


def test_a_worker_with_loras_loaded_takes_them_first_only_from_the_most_urgent_class(
    engine: Engine, tenant: IssuedKey
) -> None:
    """lifecycle.next_with_loras: same adapters in order (any scales), oldest first, never past a more urgent one."""
    model = f"affinity-test-{new_id()[:6]}"
    style, other = "aa" * 32, "bb" * 32

    queued_with_loras(engine, tenant, model, [])
    queued_with_loras(engine, tenant, model, [other, style])  # the same adapters in another order: another set
    wanted = queued_with_loras(engine, tenant, model, [style, other], scale=0.5)
    queued_with_loras(engine, tenant, model, [style, other])
    assert next_with_loras(engine, model, tenant, [style, other]) == wanted  # the oldest, whatever its scales
    assert next_with_loras(engine, model, tenant, [style]) is None
    queued_with_loras(engine, tenant, model, [], priority=0)  # a quieter tenant's is more urgent: nothing jumps it
    assert next_with_loras(engine, model, tenant, [style, other]) is None


def test_a_worker_with_one_tenants_loras_loaded_never_takes_another_tenants_prediction_ahead(
    engine: Engine, tenant: IssuedKey
) -> None:
    """Issue 29, item 9: after tenant B's prediction with LoRA X ran, A's queued prediction with X was taken
    ahead of the queue, and its note ("taken ahead … with its LoRAs loaded") told A that someone just ran X.
    Only the same tenant's predictions are taken ahead now."""
    model = f"affinity-test-{new_id()[:6]}"
    neighbour, shared = make_tenant(engine), "cc" * 32
    waiting = queued_with_loras(engine, tenant, model, [shared])
    assert next_with_loras(engine, model, neighbour, [shared]) is None  # B's X just ran: A's waits its turn
    assert next_with_loras(engine, model, tenant, [shared]) == waiting  # A's own X just ran: taken ahead
