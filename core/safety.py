"""The safety policy's shared words (docs/safety.md), torch-free: what a tenant chose (`block`, `blur`, `flag`),
what a request asked for (a dialect's flag that turns the checker off), what a prediction runs with (its params'
`safety`) and what the worker records of its check (the prediction's `safety` column)."""

from __future__ import annotations

import json
from typing import Any, Literal

Policy = Literal["block", "blur", "flag"]
Effective = Literal["block", "blur", "flag", "off"]  # "off": the request turned the checker off, as allowed
POLICIES: tuple[str, ...] = ("block", "blur", "flag")
DEFAULT_POLICY: Policy = "block"
BLOCKED_ERROR = (
    "content policy: an output was flagged by the safety checker and this account's policy blocks it; "
    "nothing was stored and nothing is billed"
)
NOT_CONFIGURED = "no safety checker is configured on this deployment (KLEIN_SAFETY_MODEL unset)"
TURNED_OFF = "the safety checker was turned off by the request"


class DisableRefused(ValueError):
    """A request asked to turn the checker off and its tenant may not (`allow_disable_safety_checker`)."""


def effective(
    policy: str | None, allow_disable: bool | None, disable_asked_by: str | None, asked: Effective = "off"
) -> Effective:
    """What a prediction runs with: the tenant's policy, or `asked` ("off"; OpenAI's `moderation: low` asks for
    "flag") where the request relaxed the checker (`disable_asked_by` names the flag it used, e.g.
    `disable_safety_checker`) and the tenant may do so."""
    if disable_asked_by is not None:
        if not allow_disable:
            raise DisableRefused(
                f"{disable_asked_by}: relaxing or turning off the safety checker is not allowed for this account "
                "(the operator's allow_disable_safety_checker setting); leave the flag unset"
            )
        return asked
    chosen = policy or DEFAULT_POLICY
    if chosen not in POLICIES:
        return DEFAULT_POLICY  # a value written outside the admin API: the safe reading
    return chosen  # type: ignore[return-value]


def status_key(queue_name: str, model_id: str) -> str:
    """Where a model's workers publish what checker they run (`checker_status`), for GET /v1/models."""
    return f"{queue_name}:safety:{model_id}"


def checker_status(model: str | None, labels: list[str], threshold: float) -> bytes:
    # json, not orjson: models/klein.py imports this module, and the GPU bench's machines have no orjson
    status = {"checked": model is not None, "model": model, "labels": labels, "threshold": threshold}
    return json.dumps(status).encode()


def unchecked(policy: str, reason: str) -> dict[str, Any]:
    """The prediction's `safety` record when no check ran: it says so and why, never a verdict."""
    return {"checked": False, "policy": policy, "model": None, "flagged": [], "reason": reason}


def checked(policy: str, model: str, flagged: list[bool], scores: list[float]) -> dict[str, Any]:
    return {
        "checked": True,
        "policy": policy,
        "model": model,
        "flagged": flagged,
        "scores": [round(score, 4) for score in scores],
        "blocked": policy == "block" and any(flagged),
    }


def public(record: dict[str, Any] | None) -> dict[str, Any]:
    """The `safety` block clients read (Pruna, ours): whether a check ran, its model, which outputs it flagged,
    and what the policy did with them. Rows from before the checker existed read as unchecked."""
    if not record:
        return {"checked": False, "model": None, "flagged": [], "policy": None, "reason": "not recorded"}
    return {key: record[key] for key in ("checked", "model", "flagged", "policy", "reason", "blocked") if key in record}


def has_nsfw_contents(record: dict[str, Any] | None, outputs: int) -> list[bool | None]:
    """WaveSpeed's per-output verdict: the check's where one ran (a blocked prediction's too, though its outputs
    are gone); `null` per output where none ran, so that no client reads "not NSFW" into an unchecked image."""
    if record and record.get("checked"):
        return list(record["flagged"])
    return [None] * outputs
