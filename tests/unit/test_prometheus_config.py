"""deploy/prometheus and deploy/grafana: valid for the real tools, and about metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from consumer.metrics import Metrics
from tests.support import REPO_ROOT

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "diagram-consumer.json"


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is not on PATH: run `sh deploy/prometheus/install.sh` (make test does)")
    return subprocess.run([tool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_scrape_config_and_rules():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        checked = promtool(*args)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alerts_fire_on_the_series_they_are_written_for():
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def exposed_names() -> set[str]:
    """Every sample name the service can expose (histogram and counter suffixes included)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(
            {
                f"{family.name}_total",
                f"{family.name}_info",
                f"{family.name}_bucket",
                f"{family.name}_sum",
                f"{family.name}_count",
            }
        )
    return names


def test_dashboard_and_alerts_only_name_metrics_the_service_exposes():
    known = exposed_names()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs.append((PROMETHEUS_DIR / "alerts.yml").read_text())
    used = {name for expr in exprs for name in re.findall(r"\bdiagram_[a-z_]+", expr)}
    assert used and used <= known, used - known
