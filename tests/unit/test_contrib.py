"""contrib/'s alert rules and dashboard (issue 15, item 6): valid, and naming only metrics bioproxy exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from twisted.trial.unittest import SkipTest, TestCase

from bioproxy.metrics import Metrics

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
RULES = CONTRIB / "prometheus" / "bioproxy-alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "bioproxy-dashboard.json"


def exported() -> set[str]:
    """Every series name a Prometheus scrape of bioproxy can show."""
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def named(expr: str) -> set[str]:
    return set(re.findall(r"\bbioproxy_[a-z_]+", expr))


class ContribTests(TestCase):
    def test_rulesNameExportedMetrics(self) -> None:
        rules = [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]
        self.assertGreaterEqual(
            {r["alert"] for r in rules},
            {"BioproxyBackendDown", "BioproxyHitRatioLow", "BioproxyQueueFull", "BioproxyWarmupFailing"},
        )
        for rule in rules:
            self.assertTrue(named(rule["expr"]), rule["alert"])
            self.assertLessEqual(named(rule["expr"]), exported(), rule["alert"])

    def test_dashboardNamesExportedMetrics(self) -> None:
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        self.assertGreater(len(exprs), 5)
        for expr in exprs:
            self.assertTrue(named(expr), expr)
            self.assertLessEqual(named(expr), exported(), expr)

    def test_promtoolChecksTheRules(self) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is missing (Debian's prometheus package; make test installs it as root)")
        result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)
