"""Router specs of the benchmarks: ``impl:policy``, and Shoal settings after a ``?``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shoal.bench.peers import RouterUnderTest, router_process


def test_spec_with_shoal_options_sets_them_in_the_router_config(tmp_path: Path) -> None:
    rut = RouterUnderTest.parse("shoal:round-robin?scrape_interval_ms=1000&load_factor=1.5")
    assert (rut.impl, rut.policy) == ("shoal", "round-robin")
    assert rut.label == "Shoal round-robin (scrape_interval_ms 1000) (load_factor 1.5)"
    proc = router_process(
        rut, ["http://127.0.0.1:1"], ["tcp://127.0.0.1:2"], port=3, log_dir=tmp_path,
        served_model="tiny",
    )  # fmt: skip
    config_path = Path(proc.argv[proc.argv.index("--config") + 1])
    config = yaml.safe_load(config_path.read_text())
    assert config["scrape_interval_ms"] == 1000  # typed, as the router's config expects
    assert config["load_factor"] == 1.5


def test_plain_specs_and_peer_options() -> None:
    assert RouterUnderTest.parse("sglang:cache_aware") == RouterUnderTest("sglang", "cache_aware")
    with pytest.raises(ValueError, match="Shoal only"):
        RouterUnderTest.parse("vllm:round_robin?x=1")
