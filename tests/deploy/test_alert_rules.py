"""The alert rules' own cases (deploy/prometheus/tests/*.test.yml), run by promtool from Debian's `prometheus`
package: each failure fires exactly the alert meant for it, a healthy stack none."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.test_deploy_manifests import ROOT

CASES = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.test.yml"))


@pytest.mark.parametrize("case", CASES, ids=lambda path: path.name)
def test_promtool_rule_cases_pass(case: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (Debian's package carries it)"
    done = subprocess.run([promtool, "test", "rules", str(case)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_webhook_cases_exist() -> None:
    assert [case.name for case in CASES if case.name.startswith("webhooks")] == ["webhooks.test.yml"]
