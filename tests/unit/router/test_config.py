"""Router config validation, flag parsing, and EndpointSlice translation (discovery)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from shoal.router.cli import add_router_arguments, config_from_args
from shoal.router.config import ConfigError, RouterConfig
from shoal.router.discovery import endpoints_from_slice


def test_defaults_are_valid() -> None:
    config = RouterConfig()
    assert (config.host, config.port, config.strategy) == ("127.0.0.1", 8080, "prefix")
    assert config.scrape_interval_s == 0.2
    assert config.scrape_interval_max_s == 0.8  # 4x the fastest unless set


@pytest.mark.parametrize(
    "data",
    [
        {"strategy": "fastest"},
        {"weights": {"no-such-scorer": 1}},
        {"weights": {"queue-depth": -1}},
        {"models": {"m": {"strategy": "nope"}}},
        {"queue_size": -1},
        {"unknown_field": 1},
        {"endpoints": [{"url": "ftp://x"}]},
        {"api_keys": {"k": {"tenant": "t", "priority": "urgent"}}},
        {"endpoints": [{"url": "http://a:1"}], "kubernetes": {"namespace": "x"}},
        {"scrape_interval_ms": 500, "scrape_interval_max_ms": 200},
    ],
)
def test_invalid_configs_fail_with_a_message(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RouterConfig.from_mapping(data)


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "strategy: least-request\nport: 9000\n"
        "models:\n  llama: {strategy: kv-aware, weights: {precise-kv: 3}}\n"
        "api_keys:\n  sk-1: {tenant: acme, priority: critical}\n"
    )
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    args = parser.parse_args(
        ["--config", str(path), "--port", "9100", "--endpoints", "http://a:1,http://b:2",
         "--weights", '{"queue-depth": 2}']
    )  # fmt: skip
    config = config_from_args(args)
    assert config.port == 9100
    assert config.strategy == "least-request"
    assert [e.url for e in config.endpoints] == ["http://a:1", "http://b:2"]
    assert config.models["llama"].strategy == "kv-aware"
    assert config.api_keys["sk-1"].tenant == "acme"
    assert config.weights == {"queue-depth": 2}


def test_endpoint_slice_translation() -> None:
    slice_obj = {
        "addressType": "IPv4",
        "metadata": {
            "name": "llama-abc",
            "labels": {"shoal.dev/model": "llama", "kubernetes.io/service-name": "llama"},
            "annotations": {"shoal.dev/kv-events-port": "5557"},
        },
        "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8000}],
        "endpoints": [
            {"addresses": ["10.244.1.5"], "conditions": {"ready": True}},
            {"addresses": ["10.244.1.6"], "conditions": {"ready": False}},
            {"addresses": ["10.244.1.7"], "conditions": {"ready": True, "terminating": True}},
            {"addresses": ["10.244.1.8"]},  # ready unknown: treated as ready
            {"addresses": []},
        ],
    }
    eps = endpoints_from_slice(slice_obj, port_name="http")
    assert [e.url for e in eps] == ["http://10.244.1.5:8000", "http://10.244.1.8:8000"]
    # The label names the Model resource; served names come from the engines' /v1/models.
    assert eps[0].models == ()
    assert ("shoal.dev/model", "llama") in eps[0].labels
    assert eps[0].kv_events_endpoint == "tcp://10.244.1.5:5557"
    assert endpoints_from_slice({**slice_obj, "addressType": "FQDN"}) == []
    assert endpoints_from_slice(slice_obj, port_name="grpc") == []
    v6 = {**slice_obj, "addressType": "IPv6", "endpoints": [{"addresses": ["fd00::1"]}]}
    assert endpoints_from_slice(v6, port_name="http")[0].url == "http://[fd00::1]:8000"


def test_scrape_interval_bounds_from_flags() -> None:
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    args = parser.parse_args(["--scrape-interval-ms", "100", "--scrape-interval-max-ms", "100"])
    config = config_from_args(args)
    assert (config.scrape_interval_s, config.scrape_interval_max_s) == (0.1, 0.1)


def test_hf_tokenizer_dirs_are_loaded_at_start(tmp_path: Path) -> None:
    from shoal.router.app import build_components
    from shoal.router.hf_tokenizer import HfTokenizers

    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        build_components(RouterConfig(tokenizer="hf", tokenizer_dirs={"m": str(tmp_path)}))
    components = build_components(RouterConfig(tokenizer="hf"))
    assert isinstance(components.gateway.tokenizers, HfTokenizers)
