"""The alert rules under Prometheus' own tool, promtool (Debian's `prometheus` package, which `bash deploy/local.sh
test` installs): both copies (deploy/prometheus/alerts.yml and the Operator's PrometheusRule) pass `promtool check
rules` and the scenarios of deploy/prometheus/alerts_test.yml, where each scenario says of every alert whether it
fires, so that "exactly the intended alert" is what promtool checks; the finer cases of one family of alerts
(deploy/prometheus/tests/*.test.yml: the webhook sender against one receiver) pass too."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_deploy_manifests import ROOT

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCENARIOS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
OPERATOR_RULES = ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"
CASES = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.test.yml"))


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(tool).exists():
        pytest.fail("promtool is missing: `apt-get install prometheus` (bash deploy/local.sh test installs it)")
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def with_rules(folder: Path, rules: str) -> Path:
    """`folder` holding the scenarios beside `rules` as the alerts.yml they name."""
    (folder / "alerts.yml").write_text(rules)
    shutil.copy(SCENARIOS, folder / "alerts_test.yml")
    return folder


def alert_names() -> set[str]:
    return {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}


@pytest.mark.parametrize("copy", ["compose", "operator"])
def test_the_rules_pass_promtools_check_and_every_scenario(copy: str, tmp_path: Path) -> None:
    if copy == "compose":
        rules = RULES.read_text()
    else:  # the PrometheusRule's spec is a rule file as it stands
        rules = yaml.safe_dump(yaml.safe_load(OPERATOR_RULES.read_text())["spec"], sort_keys=False)
    folder = with_rules(tmp_path, rules)
    checked = promtool("check", "rules", "alerts.yml", cwd=folder)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml", cwd=folder)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_scenario_says_of_every_alert_whether_it_fires_at_each_time() -> None:
    alerts = alert_names()
    for scenario in yaml.safe_load(SCENARIOS.read_text())["tests"]:
        named: dict[str, set[str]] = defaultdict(set)
        for case in scenario["alert_rule_test"]:
            named[case["eval_time"]].add(case["alertname"])
        for eval_time, names in named.items():
            assert names == alerts, f"{scenario['name']} at {eval_time}: says nothing of {sorted(alerts - names)}"


def test_the_scenarios_are_the_failures_the_issue_names() -> None:
    """Which alerts each scenario fires (promtool checks that they fire, with which labels, and no other)."""
    fired = {
        scenario["name"]: {case["alertname"] for case in scenario["alert_rule_test"] if case.get("exp_alerts")}
        for scenario in yaml.safe_load(SCENARIOS.read_text())["tests"]
    }
    assert fired == {
        "healthy stack fires nothing": set(),
        "one of two GPU workers dies; the other carries on": {"KleinTargetDown"},
        "every GPU worker dies": {"KleinNoLiveWorker", "KleinTargetDown"},
        "the API dies; the workers are fine": {"KleinTargetDown"},
        "the queue is stuck though workers announce themselves": {"KleinQueueTooOld"},
        "the webhook sender fails every attempt": {"KleinWebhookSenderFailing"},
    }


def test_a_rule_that_pages_when_the_api_is_down_fails_its_scenario(tmp_path: Path) -> None:
    """The scenarios catch the false page: "no live worker" read as absent gauges while only the API is down."""
    rules = yaml.safe_load(RULES.read_text())
    (rule,) = [rule for group in rules["groups"] for rule in group["rules"] if rule["alert"] == "KleinNoLiveWorker"]
    rule["expr"] = f'({rule["expr"]}) or absent(klein_live_workers{{job="klein-api"}})'
    naive = yaml.safe_dump(rules, sort_keys=False)
    tested = promtool("test", "rules", "alerts_test.yml", cwd=with_rules(tmp_path, naive))
    assert tested.returncode != 0
    assert "the API dies; the workers are fine" in tested.stdout + tested.stderr


@pytest.mark.parametrize("case", CASES, ids=lambda path: path.name)
def test_the_finer_cases_pass(case: Path) -> None:
    tested = promtool("test", "rules", case.name, cwd=case.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_webhook_cases_exist() -> None:
    assert [case.name for case in CASES if case.name.startswith("webhooks")] == ["webhooks.test.yml"]
