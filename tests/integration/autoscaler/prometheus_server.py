"""A real Prometheus for the autoscaler's tests: config in a temp dir, the autoscaler's recording
rules evaluated every second, started and stopped by PID (``shoal.local.ManagedProcess``)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from shoal.local import HOST, ManagedProcess, free_port

REPO = Path(__file__).resolve().parents[3]
RULES = REPO / "deploy" / "prometheus" / "autoscaler-rules.yaml"
PROMETHEUS = shutil.which("prometheus")


def fast_rules(dest: Path) -> Path:
    """The shipped rules with a 1 s evaluation interval (tests do not wait 5 s per step)."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group["interval"] = "1s"
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def write_config(workdir: Path, scrape_configs: list[dict[str, Any]]) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(fast_rules(workdir / "rules.yaml"))],
        "scrape_configs": scrape_configs,
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class PrometheusServer:
    """``prometheus`` on ``HOST:port`` with its own TSDB directory; ``prefix`` runs it through a
    wrapper (e.g. the local cluster's ``exec`` to join its network namespace)."""

    def __init__(self, workdir: Path, config: Path, prefix: list[str] | None = None) -> None:
        assert PROMETHEUS is not None, "prometheus is not installed (scripts/test installs it)"
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        argv = [
            *(prefix or []),
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address={HOST}:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        self.process = ManagedProcess("prometheus", argv, workdir / "prometheus.log", url=self.url)

    def start(self) -> None:
        self.process.start()
        self.process.wait_healthy("/-/ready", timeout_s=60)

    def stop(self) -> None:
        self.process.stop()

    def wait_for(self, promql: str, timeout_s: float = 60.0) -> float:
        """Poll until ``promql`` yields one finite value; return it."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                body = client.get(f"{self.url}/api/v1/query", params={"query": promql}).json()
                last = body.get("data", {}).get("result")
                if last:
                    value = float(last[0]["value"][1])
                    if value == value:  # not NaN
                        return value
                time.sleep(0.5)
        raise AssertionError(f"{promql} gave no value within {timeout_s}s (last {last})")
