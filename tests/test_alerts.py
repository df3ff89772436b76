"""docker/prometheus-alerts.yml: accepted by promtool, its logic unit-tested by `promtool test rules`, and fired by a
real Prometheus scraping the service's drift gauges (service/core/telemetry.py over a DriftMonitor) on a synthetic
shift, while an unchanged class stays quiet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client import start_http_server

from service.core.records.drift import DriftMonitor
from service.core.telemetry import Telemetry
from sowa.server_process import free_port
from tests.helpers import REPO, wait_for

RULES = REPO / "docker/prometheus-alerts.yml"


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    assert path, f"`{name}` is not installed: run the README's test command (it installs Debian's prometheus)"
    return path


def test_promtool_accepts_the_rules_and_the_config_loads_them() -> None:
    out = subprocess.run([_tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0 and "1 rules found" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([_tool("promtool"), "check", "config", str(REPO / "docker/prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "1 rule files found" in out.stdout, out.stdout + out.stderr
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert "./docker/prometheus-alerts.yml:/etc/prometheus/prometheus-alerts.yml:ro" in \
        compose["services"]["prometheus"]["volumes"]
    dashboard = json.loads((REPO / "docker/grafana/dashboards/sowa.json").read_text())
    drift = [p for p in dashboard["panels"] if any("sowa_score_drift_ks" in t["expr"] for t in p["targets"])]
    assert len(drift) == 1 and drift[0]["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 0.5


def test_the_rule_fires_only_on_a_large_shift_that_is_not_chance(tmp_path: Path) -> None:
    """promtool's unit tests: series for two replicas of each class, 20 minutes at one sample a minute."""
    def series(metric: str, cls: str, value: str) -> list[dict]:
        return [{"series": f'{metric}{{class_name="{cls}",instance="{i}"}}', "values": value} for i in ("a", "b")]

    cases = {  # class: (D, p, recent)
        "shifted": ("0.8x20", "0.0001x20", "200x20"),
        "small": ("0.4x20", "0.0001x20", "200x20"),  # D under 0.5
        "chance": ("0.8x20", "0.05x20", "200x20"),  # 4 shots: D 0.8 is not rare enough
        "few": ("0.8x20", "0.0001x20", "20x20"),  # under 30 recent parts
        "brief": ("0.1x5 0.8x5 0.1x10", "0.0001x20", "200x20"),  # shifted for 5 minutes only
    }
    input_series = [s for cls, (d, p, n) in cases.items() for s in
                    series("sowa_score_drift_ks", cls, d) + series("sowa_score_drift_pvalue", cls, p)
                    + series("sowa_score_drift_recent", cls, n)]
    firing = {"alertname": "SowaScoreDrift", "exp_alerts": [{
        "exp_labels": {"severity": "warning", "class_name": "shifted"},
        "exp_annotations": {
            "summary": "Scores of class shifted have drifted from its calibration",
            "description": "KS D+ between the recent passed parts of shifted and its shots is 0.80 (alert above 0.5). "
                           "Check the station (light, camera, fixture), then the class's Quality page in the "
                           "console: review recent parts, add shots or set a new threshold."}}]}
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": input_series,
        "alert_rule_test": [{"eval_time": "14m", "alertname": "SowaScoreDrift", "exp_alerts": []},  # pending
                            {"eval_time": "16m", **firing}, {"eval_time": "19m", **firing}]}]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = subprocess.run([_tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_real_prometheus_fires_on_a_synthetic_shift(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    shots = rng.normal(0.30, 0.02, 16)  # the calibration: 16 shots around 0.30, threshold 0.40
    lines = {"steady": rng.normal(0.30, 0.02, 200), "shifted": rng.normal(0.36, 0.02, 200)}  # 3 sigma up
    telemetry, monitor = Telemetry(), DriftMonitor()
    telemetry.track_drift(monitor)
    monitor.refresh(lambda n: list(lines), lambda name, n: lines[name][-n:], lambda name: (shots, 0.40))
    target = free_port()
    server, thread = start_http_server(target, addr="127.0.0.1", registry=telemetry.registry)

    # the repo's config and rules, with the target on loopback and intervals and `for` in seconds
    config = yaml.safe_load((REPO / "docker/prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{target}"]}]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    rules = yaml.safe_load(RULES.read_text())
    rules["groups"][0]["rules"][0]["for"] = "2s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / config["rule_files"][0]).write_text(yaml.safe_dump(rules))
    port = free_port()
    prom = subprocess.Popen([_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    alerts: list[dict] = []

    def firing() -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/api/v1/alerts")
        except httpx.HTTPError:  # still starting
            return False
        alerts[:] = r.json()["data"]["alerts"] if r.status_code == 200 else []
        return any(a["state"] == "firing" for a in alerts)

    try:
        wait_for(firing, 60, "Prometheus fires SowaScoreDrift", interval=0.25)
        assert [(a["labels"]["alertname"], a["labels"]["class_name"]) for a in alerts] == \
            [("SowaScoreDrift", "shifted")]  # the steady class is not even pending
        assert float(alerts[0]["value"]) == pytest.approx(monitor.get("shifted").ks)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        server.shutdown()
        thread.join(timeout=10)
