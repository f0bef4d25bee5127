"""Enhancement jobs on the worker (worker/enhance.py) against real PostgreSQL and Redis, with real tiny Qwen3 models
generating: a running job canceled stops at its next lease renewal, a finished one is billed once, and a rewrite
that the prompt policy refuses is not used."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, select

from core import enhance_jobs, redis_connection, tenants
from core.enhance import EnhanceFailed
from core.ids import new_id
from core.settings import Settings
from core.tables import enhancements
from ops.embedded import wait_until
from tests.conftest import make_tenant


def tiny_lm(initializer_range: float, seed: int, layers: int = 4) -> Any:
    """A tiny Qwen3 causal LM with the tiny pipeline's tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from models.tiny import TEXT_HIDDEN, build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, initializer_range=initializer_range,
    )  # fmt: skip
    return Qwen3ForCausalLM(config).eval(), tokenizer


def jobs(settings: Settings, engine: Engine, max_tokens: int, lm: Any) -> Any:
    from models.enhancer import LocalEnhancer
    from worker.database import Database
    from worker.enhance import Enhancements

    fast = settings.model_copy(update={"lease_s": 1.5, "enhancer_max_tokens": max_tokens})  # renewals every 0.5 s
    model, tokenizer = lm
    local = LocalEnhancer(model, tokenizer, max_tokens, "tiny")
    client = redis_connection.sync_client(fast)
    return Enhancements(fast, Database(engine, engine, 5), client, f"test:{new_id()[:8]}", local.enhance)


def job(engine: Engine, tenant_id: str, prompt: str) -> str:
    job_id = new_id()
    with engine.begin() as conn:
        conn.execute(enhance_jobs.create(job_id, tenant_id, None, "flux-klein-4b", {"prompt": prompt, "style": None}))
    return job_id


def row(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(enhancements).where(enhancements.c.id == job_id)).mappings().one()


def test_a_running_job_canceled_stops_at_its_next_renewal(settings: Settings, engine: Engine) -> None:
    key = make_tenant(engine)
    runner = jobs(settings, engine, 1024, tiny_lm(0.02, 0, layers=28))  # ~0.1 s a token: minutes if not stopped
    job_id = job(engine, key.tenant_id, "a fox")
    worker = threading.Thread(target=runner.run, args=(job_id,))
    worker.start()
    wait_until(lambda: row(engine, job_id)["status"] == "processing", 30, "the claim")
    time.sleep(0.6)  # into the generation: at least one renewal has passed
    with engine.begin() as conn:
        assert conn.execute(enhance_jobs.cancel(job_id, key.tenant_id)).first() is not None
    canceled_at = time.monotonic()
    worker.join(60)
    assert not worker.is_alive() and time.monotonic() - canceled_at < 20
    final = row(engine, job_id)
    assert final["status"] == "canceled" and final["output"] is None and final["amount"] is None


def test_a_finished_job_is_billed_once_and_a_second_delivery_does_nothing(settings: Settings, engine: Engine) -> None:
    key = make_tenant(engine, price_per_enhancement=0.5)
    runner = jobs(settings, engine, 4, tiny_lm(0.2, 1))
    job_id = job(engine, key.tenant_id, "a red barn")
    runner.run(job_id)
    done = row(engine, job_id)
    assert done["status"] == "completed" and done["output"] == "vvvv" and done["tokens"] == 4
    assert float(done["amount"]) == 0.5 and done["attempts"] == 1 and done["timings"]["enhance_ms"] >= 0
    runner.run(job_id)  # Celery redelivers: the claim finds it finished
    assert row(engine, job_id) == done


def test_the_prompt_policy_applies_to_the_rewrite(settings: Settings, engine: Engine) -> None:
    key = make_tenant(engine)
    runner = jobs(settings, engine, 6, tiny_lm(0.2, 1))
    rewritten = runner.rewrite(key.tenant_id, "a red barn", None, 0, lambda: None).prompt
    assert rewritten == "vvvvvv"  # this tiny model's words; the original prompt has none of them
    with engine.begin() as conn:
        conn.execute(tenants.set_limits(key.tenant_id, blocked_terms=[rewritten]))
    with pytest.raises(EnhanceFailed, match="refused by the content policy"):
        runner.rewrite(key.tenant_id, "a red barn", None, 0, lambda: None)
    job_id = job(engine, key.tenant_id, "a red barn")
    runner.run(job_id)
    failed = row(engine, job_id)
    assert failed["status"] == "failed" and failed["output"] is None and failed["amount"] is None
    assert failed["error"] == "the enhanced prompt was refused by the content policy (blocked terms)"
