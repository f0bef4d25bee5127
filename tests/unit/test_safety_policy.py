"""What a prediction runs with (core/safety.py): the tenant's policy, or off/flag where the request asked and the
tenant allows it; and what WaveSpeed's has_nsfw_contents says with and without a check."""

from __future__ import annotations

import pytest

from core import safety


@pytest.mark.parametrize(
    ("policy", "allow", "asked_by", "asked", "expected"),
    [
        (None, None, None, "off", "block"),  # the default
        ("blur", False, None, "off", "blur"),
        ("flag", None, None, "off", "flag"),
        ("nonsense", None, None, "off", "block"),  # written outside the admin API: the safe reading
        ("block", True, "disable_safety_checker", "off", "off"),
        ("block", True, "moderation", "flag", "flag"),
    ],
)
def test_effective(policy: str | None, allow: bool | None, asked_by: str | None, asked: str, expected: str) -> None:
    assert safety.effective(policy, allow, asked_by, asked) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("allow", [None, False])
def test_turning_off_without_the_tenant_s_leave_is_refused_naming_the_flag(allow: bool | None) -> None:
    with pytest.raises(safety.DisableRefused, match=r"^enable_safety_checker: .*allow_disable_safety_checker"):
        safety.effective("flag", allow, "enable_safety_checker")


def test_has_nsfw_contents_is_a_verdict_only_where_a_check_ran() -> None:
    record = safety.checked("blur", "m", [True, False], [0.9, 0.1])
    assert safety.has_nsfw_contents(record, 2) == [True, False]
    assert safety.has_nsfw_contents(safety.unchecked("block", safety.NOT_CONFIGURED), 2) == [None, None]
    assert safety.has_nsfw_contents(None, 1) == [None]
    blocked = safety.checked("block", "m", [False, True], [0.1, 0.9])
    assert blocked["blocked"] is True and safety.has_nsfw_contents(blocked, 0) == [False, True]
    assert safety.public(None)["checked"] is False
