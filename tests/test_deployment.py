"""Deployment, checked without a Docker engine: the Dockerfile linted, the compose file validated by
docker-compose, the scrape config exercised by a real Prometheus, and replicas sharing one data directory run
as plain processes on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from service.client import ApiError, SowaClient
from sowa.server_process import ServerProcess, free_port
from tests.helpers import PARITY, REPO, wait_for

SHOTS = sorted(PARITY.glob("shots/*.png"))
TESTS = sorted(PARITY.glob("test/*.png"))


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    assert path, f"`{name}` is not installed: run the README's test command (it installs it)"
    return path


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run([_tool("hadolint"), "--failure-threshold", "warning", "Dockerfile"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "/readyz" in text and "USER 10001" in text
    assert text.count("FROM ") >= 2  # multi-stage: the runtime stage has no build tools


def test_the_image_holds_every_package_and_the_tested_torch() -> None:
    """The image installs each package pyproject names (the console script lives in sowa/), with CI's pins."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    text = (REPO / "Dockerfile").read_text()
    assert all(f"COPY {name} ./{name}" in text for name in packages), packages
    assert "-c constraints/ci.txt" in text and "COPY constraints ./constraints" in text
    assert project["project"]["scripts"]["sowa"].split(".")[0] in packages


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_file_is_valid(profile: str) -> None:
    env = {**os.environ, "COMPOSE_PROFILES": profile}
    env.pop("SOWA_STORE", None)
    out = subprocess.run([_tool("docker-compose"), "-f", "docker-compose.yml", "config"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    services = config["services"]
    assert {"lb", "prometheus", "grafana"} <= set(services)
    api = services["api" if profile == "gpu" else "api-cpu"]
    assert any(str(v).endswith(":/bundles:ro") for v in api["volumes"]), api["volumes"]
    assert any(str(v).startswith("sowa-data:/data") for v in api["volumes"]), api["volumes"]
    assert api["restart"] == "unless-stopped" and "readyz" in str(api["healthcheck"]["test"])
    from service.core.settings import Settings

    unknown = set(api["environment"]) - {f"SOWA_{name.upper()}" for name in Settings.model_fields}
    assert not unknown, f"compose sets variables the service does not read: {unknown}"
    if profile == "gpu":  # compose's defaults are valid settings (extra="forbid" and the validators run)
        values = {k.removeprefix("SOWA_").lower(): v for k, v in api["environment"].items() if v != ""}
        assert Settings(**values).compile_mode is None and Settings(**values).image_decoder == "pil"
    if profile == "gpu":
        devices = api["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    else:
        assert api["environment"]["SOWA_DEVICE"] == "cpu" and "deploy" not in api


def test_compose_postgres_profile_stores_classes_in_postgres() -> None:
    env = {**os.environ, "COMPOSE_PROFILES": "cpu,postgres", "SOWA_STORE": "postgresql://sowa:sowa@postgres:5432/sowa"}
    out = subprocess.run([_tool("docker-compose"), "-f", "docker-compose.yml", "config"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    db = services["postgres"]
    assert "pg_isready" in db["healthcheck"]["test"] and any("postgres-data:" in str(v) for v in db["volumes"])
    assert services["api-cpu"]["environment"]["SOWA_STORE"] == env["SOWA_STORE"]
    user, database = db["environment"]["POSTGRES_USER"], db["environment"]["POSTGRES_DB"]
    assert env["SOWA_STORE"].startswith(f"postgresql://{user}:") and env["SOWA_STORE"].endswith(f"/{database}")
    assert db["profiles"] == ["postgres"]  # optional: the directory store stays the default


def test_grafana_dashboard_covers_the_service() -> None:
    import json

    dash = json.loads((REPO / "docker/grafana/dashboards/sowa.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("sowa_images_total", "sowa_request_duration_seconds_bucket", "sowa_batch_size_sum",
                   "sowa_queue_depth", "sowa_device_memory_bytes"):
        assert metric in exprs, metric


@pytest.fixture(scope="module")
def replicas(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two replicas sharing one data directory, for the module's server tests (one start of each instead of one
    per test; each test uses classes of its own)."""
    root = tmp_path_factory.mktemp("replicas")
    with ServerProcess(bundle, root / "data", root / "a.log") as a, ServerProcess(bundle, root / "data",
                                                                                    root / "b.log") as b:
        yield a, b


@pytest.mark.slow
def test_real_prometheus_scrapes_the_service(replicas: tuple[ServerProcess, ServerProcess], tmp_path: Path) -> None:
    srv = replicas[0]
    with SowaClient(srv.url) as c:
        c.predict(TESTS[:1], heatmap="none")
        # the repo's scrape config, with Docker's service discovery swapped for the server on loopback
        config = yaml.safe_load((REPO / "docker/prometheus.yml").read_text())
        job = config["scrape_configs"][0]
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{srv.port}"]}]
        config["global"]["scrape_interval"] = "1s"
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prom = subprocess.Popen([_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result: list = []

        def scraped() -> bool:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                              params={"query": 'sowa_requests_total{endpoint="/predict",status="200"}'})
            except httpx.HTTPError:  # Prometheus still starting
                return False
            result[:] = r.json()["data"]["result"] if r.status_code == 200 else []
            return bool(result)

        try:
            wait_for(scraped, 60, "Prometheus returns a sowa_ series", interval=0.5)
            assert float(result[0]["value"][1]) >= 1 and result[0]["metric"]["job"] == "sowa"
        finally:
            prom.terminate()
            prom.wait(timeout=30)


@pytest.mark.slow
def test_replicas_share_classes_within_two_seconds(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = replicas
    with SowaClient(a.url) as ca, SowaClient(b.url) as cb:

        def known(client: SowaClient, name: str, shots: int | None = None) -> bool:
            try:
                info = client.get_class(name)
            except ApiError:
                return False
            return shots is None or info.shots == shots

        ca.register_shots("widget", SHOTS)
        assert wait_for(lambda: known(cb, "widget", 3), 2.0, "B sees the class A registered") < 2.0
        pa = ca.predict(TESTS, class_name="widget", heatmap="raw")
        pb = cb.predict(TESTS, class_name="widget", heatmap="raw")
        assert [r.score for r in pa.results] == [r.score for r in pb.results]

        cb.register_shots("widget", SHOTS[:1], mode="replace")  # a change made on B reaches A
        wait_for(lambda: known(ca, "widget", 1), 2.0, "A sees the shots B replaced")
        cb.set_threshold("widget", 0.77)
        wait_for(lambda: ca.get_class("widget").threshold == 0.77, 2.0, "A sees B's threshold")

        ca.delete_class("widget")
        wait_for(lambda: not known(cb, "widget"), 2.0, "B sees A's delete")


@pytest.mark.slow
def test_concurrent_appends_on_two_replicas_lose_nothing(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    a, b = replicas
    with SowaClient(a.url) as ca, SowaClient(b.url) as cb:
        ca.register_shots("gear", SHOTS[:1])
        wait_for(lambda: "gear" in {c.name for c in cb.list_classes()}, 2.0, "B sees the class")
        with ThreadPoolExecutor(2) as pool:  # the file lock makes the two appends take turns
            list(pool.map(lambda cs: cs[0].register_shots("gear", cs[1], mode="append"),
                          [(ca, SHOTS[1:2]), (cb, SHOTS[2:3])]))
        wait_for(lambda: ca.get_class("gear").shots == 3 and cb.get_class("gear").shots == 3, 2.0,
                 "both replicas see all three shots")
