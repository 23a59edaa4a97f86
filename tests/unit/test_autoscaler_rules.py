"""The autoscaler's recording rules: valid for Prometheus, and computing what the loop expects
(``promtool test rules`` over deploy/prometheus/autoscaler-rules.test.yaml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shoal.autoscaler import observe

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "autoscaler-rules.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "autoscaler-rules.test.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing (Debian prometheus; scripts/test installs it)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, cwd=RULES.parent, timeout=60
    )


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_rules_compute_the_expected_values() -> None:
    out = _promtool("test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_loop_reads_only_series_the_rules_record() -> None:
    recorded = {
        r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
    }
    read = {
        observe.REQUEST_RATE,
        observe.PROMPT_TOKENS_RATE,
        observe.OUTPUT_TOKENS_RATE,
        observe.PROMPT_TOKENS_MEAN,
        observe.OUTPUT_TOKENS_MEAN,
        observe.WAITING,
        observe.RUNNING,
        observe.KV_USAGE,
        observe.TTFT_BUCKETS,
        observe.TPOT_BUCKETS,
        observe.ENGINES_UP,
        observe.ROUTER_HELD,
    }
    assert read <= recorded, read - recorded
