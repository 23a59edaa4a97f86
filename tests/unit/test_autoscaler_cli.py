"""``shoal autoscaler``: flags, and the clear refusals that happen before anything starts."""

from __future__ import annotations

import argparse

import pytest

from shoal.api.model import AutoscalingPolicy
from shoal.autoscaler.cli import add_autoscaler_arguments, load_policy_factory, run_autoscaler
from shoal.autoscaler.policies import build_policy
from shoal.autoscaler.policy import Policy


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_autoscaler_arguments(parser)
    return parser.parse_args(["--prometheus-url", "http://p:9090", *argv])


def test_default_factory_builds_the_model_policies() -> None:
    factory = load_policy_factory("shoal.autoscaler.policies:build_policy")
    assert factory is build_policy
    policy = factory(AutoscalingPolicy(enabled=True, policy="kpa"))
    assert isinstance(policy, Policy) and policy.name == "kpa"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-colon", "module:function"),
        ("shoal.no_such_module:f", "cannot import"),
        ("shoal.autoscaler.policies:nope", "no function"),
    ],
)
def test_bad_policy_factory_is_a_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_policy_factory(spec)


def test_refusals_before_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert run_autoscaler(_args()) == 2  # no namespace anywhere
    assert "no namespace" in capsys.readouterr().err
    assert run_autoscaler(_args("-n", "a", "--interval-s", "0")) == 2
    assert "must be > 0" in capsys.readouterr().err
    assert run_autoscaler(_args("-n", "a", "--lease-duration-s", "5", "--lease-renew-s", "5")) == 2
    assert "shorter than the lease duration" in capsys.readouterr().err
    assert run_autoscaler(_args("-n", "a", "--policy-factory", "x")) == 2
    assert "module:function" in capsys.readouterr().err
