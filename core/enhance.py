"""The prompt enhancer's contract (docs/enhancer.md), torch-free: what the model is asked (system prompt, styles),
how its answer is cleaned, the `enhance_prompt` flag's modes, and the `openai` backend's HTTP call.

Both backends run in the GPU worker (worker/enhance.py): `local` on the worker's own Qwen3 (models/enhancer.py),
`openai` against an OpenAI-compatible chat endpoint, reached through the SSRF guard (core/netguard.py) unless its
host is on KLEIN_ENHANCER_ALLOWLIST.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import orjson

from core import netguard
from core.settings import Settings

MAX_PROMPT_CHARS = 4096  # models.klein.MAX_PROMPT_CHARS: the rewrite must be a valid prompt
MAX_ANSWER_BYTES = 1 << 20  # an openai endpoint's answer, at most
Mode = Literal["off", "strict", "best_effort"]  # GenerationParams.enhance: from the input's `enhance_prompt`
Style = Literal["photo", "cinematic", "illustration", "anime", "3d", "painting"]

SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-image model. Rewrite the user's prompt as one detailed, faithful image "
    "description: keep every subject, attribute, count, text to render and constraint it names, add concrete "
    "visual detail (composition, lighting, materials, colours, setting) that fits it, and invent nothing that "
    "contradicts it. Answer with the rewritten prompt only: no preamble, no quotes, no lists, no explanations, "
    "at most 120 words."
)
EDIT_NOTE = (
    "The prompt is an instruction for editing {count} reference image(s) you cannot see: rewrite it as a precise "
    "edit instruction, keep what it asks to change and say that everything else stays as it is."
)
STYLE_NOTES: dict[str, str] = {
    "photo": "Render it as a realistic photograph (camera, lens, light).",
    "cinematic": "Render it as a cinematic film still (framing, dramatic light, colour grade).",
    "illustration": "Render it as a clean digital illustration.",
    "anime": "Render it in an anime style.",
    "3d": "Render it as a 3D render (materials, soft global illumination).",
    "painting": "Render it as a painting (medium, brushwork).",
}
# Control characters other than tab and newline: PostgreSQL refuses NUL, and none belongs in a prompt.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class EnhanceFailed(RuntimeError):
    """The enhancer gave no usable rewrite; the message is the reason a client reads."""


@dataclass
class Enhanced:
    """A rewrite and what it took."""

    prompt: str
    model: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    timings: dict[str, int] = field(default_factory=dict)  # enhance_ms


def mode(flag: bool | str) -> Mode:
    """GenerationParams.enhance for an input's `enhance_prompt` (false, true or "best_effort")."""
    if flag == "best_effort":
        return "best_effort"
    return "strict" if flag is True else "off"


def messages(prompt: str, style: str | None = None, references: int = 0) -> list[dict[str, str]]:
    """The conversation the model answers: the system prompt (with the edit and style notes that apply), then the
    user's prompt as the user turn."""
    system = SYSTEM_PROMPT
    if references:
        system += " " + EDIT_NOTE.format(count=references)
    if style:
        system += " " + STYLE_NOTES[style]
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def clean(text: str) -> str:
    """The model's answer as a prompt: a leftover thinking block, control characters, wrapping quotes and
    surrounding space removed, cut to the prompt's limit. EnhanceFailed when nothing is left."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", text)).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    text = text[:MAX_PROMPT_CHARS].strip()
    if not text:
        raise EnhanceFailed("the prompt enhancer returned no text")
    return text


def openai_chat(settings: Settings, conversation: list[dict[str, str]], client: httpx.Client | None = None) -> Enhanced:
    """One rewrite from an OpenAI-compatible `POST {KLEIN_ENHANCER_URL}/chat/completions`: greedy, bounded tokens,
    Qwen3's thinking switched off for servers that read `chat_template_kwargs` (vLLM, SGLang). The endpoint's
    address passes the SSRF guard unless allow-listed; no redirects are followed."""
    if not settings.enhancer_url:
        raise EnhanceFailed("the prompt enhancer is not configured (KLEIN_ENHANCER_URL is unset)")
    started = time.perf_counter()
    try:
        url, port = netguard.target(settings.enhancer_url.rstrip("/") + "/chat/completions")
        assert url.host
        pinned, headers, extensions = netguard.pin(url, netguard.resolve(url.host, port), settings.enhancer_allowlist)
    except netguard.FetchError as exc:
        raise EnhanceFailed(f"the prompt enhancer's endpoint cannot be used: {exc}") from None
    if settings.enhancer_api_key is not None:
        headers["Authorization"] = f"Bearer {settings.enhancer_api_key.get_secret_value()}"
    body: dict[str, Any] = {
        "model": settings.enhancer_model,
        "messages": conversation,
        "temperature": 0,
        "max_tokens": settings.enhancer_max_tokens,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    own = client is None
    http = client or httpx.Client(timeout=settings.enhancer_timeout_s, follow_redirects=False)
    try:
        with http.stream("POST", pinned, headers=headers, extensions=extensions, json=body) as response:
            data = b""
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_ANSWER_BYTES:
                    raise EnhanceFailed("the prompt enhancer's answer is too large")
    except httpx.HTTPError as exc:
        raise EnhanceFailed(f"the prompt enhancer's endpoint could not be reached ({type(exc).__name__})") from None
    finally:
        if own:
            http.close()
    if response.status_code != 200:
        raise EnhanceFailed(f"the prompt enhancer's endpoint answered HTTP {response.status_code}")
    try:
        answer = orjson.loads(data)
        text = answer["choices"][0]["message"]["content"]
        usage = answer.get("usage") or {}
        if not isinstance(text, str):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise EnhanceFailed("the prompt enhancer's endpoint gave no chat completion") from None
    return Enhanced(
        prompt=clean(text),
        model=str(answer.get("model") or settings.enhancer_model),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        new_tokens=int(usage.get("completion_tokens") or 0),
        timings={"enhance_ms": round((time.perf_counter() - started) * 1000)},
    )
