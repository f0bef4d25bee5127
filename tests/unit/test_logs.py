"""core/logs.py in both formats, in a process of its own (it configures the process's logging): credentials masked
however deep they sit in a line's fields, bytes and exception text included, and tracebacks without locals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KEY = "kl_" + "A1b2C3d4" + "SECRETpartOFtheKEY0123456789abcdefghijklm"
ADMIN = "admin-" + "Zq9" * 12  # the process's own secret: masked by its value, wherever it shows
BEARER = "tok" + "E" * 30
WHSEC = "whsec_" + "c2VjcmV0" * 5
SIGNATURE = "v1," + "SIGsig" * 8 + "=="
FAL = "0f5e3a1c-3f0b-4cde-9a77-2b1d6c7e8f90:" + "f" * 32
ROOT = Path(__file__).resolve().parents[2]
HIDDEN = [KEY[11:], ADMIN, BEARER, WHSEC[6:], SIGNATURE[3:], FAL, "localpassword"]

SCRIPT = f"""
import logging, structlog
from core import logs
logs.configure(FORMAT, secrets=[{ADMIN!r}])
scope = {{"type": "http", "headers": [(b"apikey", {KEY.encode()!r}), (b"authorization", b"Bearer {BEARER}"),
          (b"x-admin-key", {ADMIN.encode()!r}), (b"x-key", b"{KEY}"), (b"api-key", b"{KEY}")]}}
structlog.get_logger("klein.test").warning(
    "nested", scope=scope, more=[{{"webhook_secret": "{WHSEC}"}}, ("webhook-signature", "{SIGNATURE}")],
    fal={{"Authorization": "Key {FAL}"}}, raw={KEY.encode()!r}, url="postgresql://klein:localpassword@db/klein",
)
def handler(apikey):
    password = "localpassword"
    raise RuntimeError('failed for ' + apikey)
try:
    handler({KEY!r})
except RuntimeError:
    logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
"""


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_credentials_are_masked_however_deep_and_tracebacks_show_no_locals(log_format: str, tmp_path: Path) -> None:
    script = tmp_path / "log.py"
    script.write_text(f"FORMAT = {log_format!r}\n" + SCRIPT)
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # this tree's core/logs.py
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    text = done.stderr
    leaked = [secret for secret in HIDDEN if secret in text]
    assert not leaked, text
    assert "kl_A1b2C3d4…" in text, "a key's first characters stay, to tell keys apart"
    assert "RuntimeError: failed for kl_A1b2C3d4…" in text and "raise RuntimeError('failed for ' + apikey)" in text
    assert "password = " not in text, "no frame's locals"
    if log_format == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        assert [line["logger"] for line in lines] == ["klein.test", "uvicorn.error"]
        assert "Traceback (most recent call last)" in lines[1]["exception"]


def test_the_quick_look_for_a_credential_misses_none_the_full_pattern_masks() -> None:
    """Redactor looks for where a credential could start before it runs its full pattern: whatever the full
    pattern masks, the look finds (in any case), and a line with nothing to mask comes back as it was."""
    from core.logs import Redactor

    redactor = Redactor([ADMIN, "MiXeD-Case-Secret-Value"])
    lines = [
        f"key {KEY}",
        f"GET /x?expires=1&signature={'ab' * 32} 200",
        f"secret {WHSEC} and {SIGNATURE}",
        f"Authorization: Bearer {BEARER}",
        f"AUTHORIZATION = Token {BEARER}",
        "postgresql://klein:localpassword@db/klein",
        f'{{"X-Admin-Key": "{ADMIN}"}}',
        "(b'APIKEY', b'anything')",
        "Password=hunter2",
        "the value mixed-case-secret-value and MiXeD-Case-Secret-Value",
        f"fal Key {FAL}",
    ]
    for line in lines:
        masked = redactor.pattern.sub(redactor._mask, line)
        assert masked != line, line
        assert redactor(None, "", line) == masked, line
    plain = '{"method": "GET", "route": "/v1/predictions/{prediction_id}", "status": 200, "event": "request"}'
    assert redactor(None, "", plain) == plain
