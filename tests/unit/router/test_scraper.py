"""The partial /metrics parser against a real vLLM exposition, and /v1/models parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.router.scraper import kv_source_from, parse_engine_metrics, parse_models

GOLDEN = Path("/work/shared/golden/vllm-0.32.0/main/096_metrics_after_traffic.prom")


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden recordings not available")
def test_parses_golden_vllm_metrics() -> None:
    text = GOLDEN.read_text()
    result = parse_engine_metrics(text)
    m = result.metrics
    assert result.block_size == 32
    assert m.num_requests_running == 0.0
    assert m.num_requests_waiting == 0.0
    assert 0.0 <= m.kv_cache_usage <= 1.0
    assert m.prefix_cache_queries > 0
    # The newest lora_requests_info series is the current one: traffic is over, none active
    # (an older series still names tiny-lora).
    assert m.max_loras == 2
    assert m.active_loras == ()


def test_sums_engines_and_filters_model() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running x",
            'vllm:num_requests_running{engine="0",model_name="a"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="a"} 2.0',
            'vllm:num_requests_running{engine="0",model_name="b"} 7.0',
            'vllm:num_requests_waiting{engine="0",model_name="a"} 4.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.25',
            'vllm:kv_cache_usage_perc{engine="1",model_name="a"} 0.5',
            'vllm:num_requests_running_bogus{model_name="a"} 99',
            "garbage line {",
            'vllm:num_requests_waiting{model_name="a"} not-a-number',
        ]
    )
    m = parse_engine_metrics(text, "a").metrics
    assert (m.num_requests_running, m.num_requests_waiting, m.kv_cache_usage) == (5.0, 4.0, 0.5)
    assert parse_engine_metrics(text).metrics.num_requests_running == 12.0


def test_finds_samples_on_the_first_and_last_line_and_skips_longer_names() -> None:
    # No trailing newline, a wanted family on line one, and names that merely start with a
    # wanted one (a suffix, or a HELP line mentioning it) must not count.
    text = "\n".join(
        [
            "vllm:num_requests_waiting 2",
            "# HELP vllm:num_requests_running running requests",
            "vllm:num_requests_running_total 50",
            'vllm:num_requests_runningx{a="b"} 60',
            "vllm:num_requests_running 3",
        ]
    )
    m = parse_engine_metrics(text).metrics
    assert (m.num_requests_waiting, m.num_requests_running) == (2.0, 3.0)


def test_models_split_bases_and_adapters() -> None:
    served = parse_models(
        {
            "data": [
                {"id": "tiny", "root": "org/tiny", "parent": None},
                {"id": "ad", "root": "/x", "parent": "tiny"},
                "junk",
            ]
        }
    )
    assert served.bases == ("tiny",)
    assert served.adapters == {"ad": "tiny"}
    assert served.roots == {"tiny": "org/tiny"}
    with pytest.raises(ValueError):
        parse_models([])


def test_kv_source_rehosts_wildcard_binds() -> None:
    payload = {"0": {"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": None}}
    assert kv_source_from(payload, "http://10.1.2.3:8000") == ("tcp://10.1.2.3:5557", None)
    assert kv_source_from({}, "http://h:1") is None
