"""A real Prometheus server scrapes the portal and computes a busy container's CPU rate."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from compute.models import Host
from tenants import services
from tenants.actors import Actor
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def sampling_host(world: World, store_dir: Path) -> Iterator[Host]:
    host = make_host("bht-metrics")
    with host_agent(host, BULKHEAD_STORE_DIR=str(store_dir), BULKHEAD_SAMPLE_SECONDS="1"):
        yield host
    cleanup_host(host)


@pytest.fixture
def prometheus(live_server: Any, world: World, tmp_path: Path) -> Iterator[str]:
    _token, secret = services.create_token(actor=Actor(user=world.user("oscar")), name="prometheus")
    target = live_server.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: bulkhead\n"
        "    metrics_path: /metrics\n"
        f"    authorization: {{credentials: '{secret}'}}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = _free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    try:
        answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    except (httpx.TransportError, ValueError):
        return []
    return list(answer.get("data", {}).get("result", []))


def test_it_lets_prometheus_compute_a_busy_workloads_cpu_rate(
    world: World, busybox: Any, sampling_host: Host, prometheus: str
) -> None:
    response = create(
        world, "mia", name="busy", image=str(busybox.pk), command=["/bin/sh", "-c", "while :; do :; done"]
    )
    assert finished(response.json()["id"]).state == "succeeded"
    workload_in("busy", {"running"})
    rate = 'rate(bulkhead_workload_cpu_seconds_total{name="busy",tenant="acme"}[6s])'
    result = wait_until(
        lambda: [r for r in query(prometheus, rate) if float(r["value"][1]) > 0.2],
        timeout=90,
        interval=1,
        what="Prometheus to see the busy loop's CPU rate",
    )
    assert float(result[0]["value"][1]) <= 1.5  # one busy thread: about one core, never many
    up = query(prometheus, 'up{job="bulkhead"}')
    assert up and up[0]["value"][1] == "1"
    assert query(prometheus, 'bulkhead_host_up{host="bht-metrics"}')
