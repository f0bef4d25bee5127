"""The API's side of the safety policy (docs/safety.md): a submit's prompt against the blocked terms, and the
checker policy the prediction runs with (the tenant's, or off where the request asked and the tenant may)."""

from __future__ import annotations

import functools
import logging

from api.context import AppContext
from api.errors import CONTENT_POLICY, ContentRefused, Invalid
from api.services.principals import Principal
from core import prompt_policy, safety
from models.klein import GenerationParams

log = logging.getLogger(__name__)
PROMPT_REFUSED = "prompt refused by the content policy (blocked terms); rephrase the prompt"


@functools.lru_cache(maxsize=4)
def operator_terms(path: str | None) -> tuple[str, ...]:
    """KLEIN_PROMPT_BLOCKLIST, read once per process (a change takes a restart, like every setting)."""
    return prompt_policy.read_terms(path)


def screen(
    ctx: AppContext,
    principal: Principal,
    params: GenerationParams,
    disable_asked_by: str | None = None,
    asked: safety.Effective = "off",
) -> GenerationParams:
    """`params` with the policy its worker applies; refused (400, the dialect's shape) when the prompt has a
    blocked term, 422 when the request turns the checker off and the tenant may not."""
    terms = operator_terms(ctx.settings.prompt_blocklist) + principal.blocked_terms
    if prompt_policy.blocked(params.prompt, terms):
        log.info("prompt refused by the content policy")  # the tenant is bound to the log line; never the prompt
        raise ContentRefused(PROMPT_REFUSED, code=CONTENT_POLICY)
    try:
        policy = safety.effective(
            principal.safety_policy, principal.allow_disable_safety_checker, disable_asked_by, asked
        )
    except safety.DisableRefused as exc:
        raise Invalid(f"invalid request: {exc}") from None
    return params.model_copy(update={"safety": policy})
