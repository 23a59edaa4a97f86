"""The autoscaler loop's pure parts: observations from query answers, the missing-data guard,
the state annotation and the replica patch."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from shoal.autoscaler.actuator import scale_patch
from shoal.autoscaler.loop import (
    HOLD_MISSING,
    HOLD_PARTIAL,
    HOLD_POLICY_ERROR,
    HOLD_PROMETHEUS,
    guarded_decision,
)
from shoal.autoscaler.observe import INPUTS, PoolTarget, build_observation, pool_queries
from shoal.autoscaler.policy import Decision, Observation, Policy, PoolSpec
from shoal.autoscaler.state import (
    MAX_STATE_BYTES,
    PoolState,
    StateError,
    decode_state,
    encode_state,
)

SPEC = PoolSpec(model="m", gpu="H100", min_replicas=1, max_replicas=6)


class FixedPolicy:
    """Says ``replicas`` whatever it sees; counts its calls."""

    name = "fixed"

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.calls = 0

    def decide(self, spec: PoolSpec, obs: Observation) -> Decision:
        self.calls += 1
        return Decision(self.replicas, "fixed")

    def export_state(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def import_state(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


class BrokenPolicy(FixedPolicy):
    def decide(self, spec: PoolSpec, obs: Observation) -> Decision:
        raise ZeroDivisionError("bug")


def _values(**over: float | None) -> dict[str, float | None]:
    vals: dict[str, float | None] = {name: 1.0 for name in INPUTS}
    vals.update(over)
    return vals


def test_policies_in_tests_implement_the_protocol() -> None:
    assert isinstance(FixedPolicy(1), Policy)


def test_queries_select_the_pool_and_the_slo_percentile() -> None:
    target = PoolTarget("ns", "llama", "h100", 'org/"odd"', percentile=95.0)
    q = pool_queries(target)
    assert set(q) == set(INPUTS)
    assert 'namespace="ns", model="llama", pool="h100"' in q["request_rate"]
    assert q["ttft_s"].startswith("histogram_quantile(0.95, sum by (le) (")
    assert "shoal_pool:time_per_output_token_seconds_bucket:rate30s" in q["tpot_s"]
    # the router's label is the served name, quoted safely
    assert 'model="org/\\"odd\\""' in q["router_held"]


def test_missing_inputs_stay_unknown_never_zero() -> None:
    reading = build_observation(
        _values(request_rate=None, ttft_s=None, router_held=None),
        time_s=10.0,
        ready_replicas=2,
        desired_replicas=2,
    )
    assert reading.observation.request_rate is None
    assert reading.observation.ttft_s is None
    assert reading.missing == ("request_rate",)
    assert not reading.complete
    # no router series: nothing held that we know of, exported as unknown
    assert reading.observation.router_held == 0.0
    assert reading.values["router_held"] is None


def test_a_pool_without_replicas_has_zero_load_not_unknown() -> None:
    reading = build_observation(
        _values(request_rate=None, waiting=None, running=None, router_held=3.0),
        time_s=0.0,
        ready_replicas=0,
        desired_replicas=0,
    )
    assert reading.complete
    obs = reading.observation
    assert (obs.request_rate, obs.waiting, obs.running, obs.router_held) == (0.0, 0.0, 0.0, 3.0)
    # ...but a pool whose replicas are starting has no data, not zero load
    starting = build_observation(
        _values(request_rate=None, waiting=None, running=None),
        time_s=0.0,
        ready_replicas=0,
        desired_replicas=2,
    )
    assert starting.missing == ("request_rate", "waiting", "running")


def test_prometheus_down_holds_current_replicas_without_asking_the_policy() -> None:
    policy = FixedPolicy(1)
    d = guarded_decision(policy, SPEC, None, current=4)
    assert (d.replicas, d.reason, policy.calls) == (4, HOLD_PROMETHEUS, 0)


@pytest.mark.parametrize("gone", ["request_rate", "waiting", "running"])
def test_missing_load_signal_holds(gone: str) -> None:
    policy = FixedPolicy(1)
    reading = build_observation(
        _values(**{gone: None}), time_s=0.0, ready_replicas=4, desired_replicas=4
    )
    d = guarded_decision(policy, SPEC, reading, current=4)
    assert (d.replicas, d.reason, policy.calls) == (4, HOLD_MISSING, 0)
    assert d.detail == {f"missing_{gone}": 1.0}


def test_nan_from_prometheus_counts_as_missing() -> None:
    # the client turns NaN into None; an Observation given NaN directly is incomplete too
    obs = Observation(time_s=0, ready_replicas=1, desired_replicas=1, request_rate=math.nan,
                      waiting=0.0, running=0.0)  # fmt: skip
    assert not obs.is_complete()


def test_complete_data_follows_the_policy_within_bounds() -> None:
    reading = build_observation(_values(engines_up=3.0), time_s=0, ready_replicas=3,
                                desired_replicas=3)  # fmt: skip
    assert guarded_decision(FixedPolicy(5), SPEC, reading, current=3).replicas == 5
    assert guarded_decision(FixedPolicy(50), SPEC, reading, current=3).replicas == 6  # max
    assert guarded_decision(FixedPolicy(0), SPEC, reading, current=3).replicas == 1  # min


def test_scale_down_needs_every_ready_replica_scraped() -> None:
    partial = build_observation(_values(engines_up=1.0), time_s=0, ready_replicas=3,
                                desired_replicas=3)  # fmt: skip
    down = guarded_decision(FixedPolicy(1), SPEC, partial, current=3)
    assert (down.replicas, down.reason) == (3, HOLD_PARTIAL)
    # scaling up on partial data is allowed: it can only add capacity
    up = guarded_decision(FixedPolicy(5), SPEC, partial, current=3)
    assert (up.replicas, up.reason) == (5, "fixed")


def test_a_failing_policy_holds() -> None:
    reading = build_observation(_values(), time_s=0, ready_replicas=1, desired_replicas=1)
    d = guarded_decision(BrokenPolicy(3), SPEC, reading, current=2)
    assert (d.replicas, d.reason) == (2, HOLD_POLICY_ERROR)


def test_state_round_trips() -> None:
    pools = {"h100": PoolState("kpa", 3, "panic", 1700000000.5, {"window": [1.0, 2.5]})}
    assert decode_state(encode_state(pools)) == pools
    assert decode_state(None) == {}


def test_state_limits_and_corruption_are_errors() -> None:
    huge = {"p": PoolState("kpa", 1, "x", 0.0, {"w": list(range(MAX_STATE_BYTES // 2))})}
    with pytest.raises(StateError, match="limit"):
        encode_state(huge)
    with pytest.raises(StateError, match="plain JSON"):
        encode_state({"p": PoolState("kpa", 1, "x", 0.0, {"w": math.nan})})
    with pytest.raises(StateError, match="not JSON"):
        decode_state("{nope")
    with pytest.raises(StateError, match="version"):
        decode_state(json.dumps({"version": 99, "pools": {}}))
    with pytest.raises(StateError, match="pool 'p'"):
        decode_state(json.dumps({"version": 1, "pools": {"p": {"replicas": -1}}}))


def test_scale_patch_tests_the_pool_name_and_keeps_the_total_consistent() -> None:
    obj = {
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"replicas": 3, "pools": [{"name": "a", "replicas": 2}, {"name": "b"}]},
    }
    ops = scale_patch(obj, {"b": 4}, "{}")
    assert ops[0] == {"op": "test", "path": "/spec/pools/1/name", "value": "b"}
    assert ops[1] == {"op": "add", "path": "/spec/pools/1/replicas", "value": 4}
    assert {"op": "replace", "path": "/spec/replicas", "value": 6} in ops
    assert ops[-2] == {"op": "add", "path": "/metadata/annotations", "value": {}}
    assert ops[-1]["path"] == "/metadata/annotations/shoal.dev~1autoscaler-state"
    with pytest.raises(KeyError):
        scale_patch(obj, {"nope": 1}, None)
    # state only: nothing about replicas
    assert [o["op"] for o in scale_patch(obj, {}, "{}")] == ["add", "add"]
