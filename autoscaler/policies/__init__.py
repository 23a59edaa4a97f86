"""Sizing policies behind one interface (``shoal.autoscaler.policy.Policy``).

``build_policy`` turns a Model's ``spec.autoscaling`` into a policy object; the live loop keeps
one per pool, and the cluster simulator runs the same objects on its virtual clock.
"""

from __future__ import annotations

from shoal.api.model import AutoscalingPolicy
from shoal.autoscaler.policies.apa import ApaPolicy
from shoal.autoscaler.policies.hpa import DEFAULT_TARGET_QUEUE_DEPTH, HpaPolicy
from shoal.autoscaler.policies.kpa import (
    DEFAULT_TARGET_CONCURRENCY,
    PANIC_WINDOW_S,
    STABLE_WINDOW_S,
    TARGET_UTILIZATION,
    KpaPolicy,
)
from shoal.autoscaler.policies.slo import SloPolicy
from shoal.autoscaler.policy import Policy

POLICY_NAMES = ("slo", "kpa", "apa", "hpa")

__all__ = ["POLICY_NAMES", "ApaPolicy", "HpaPolicy", "KpaPolicy", "SloPolicy", "build_policy"]


def build_policy(autoscaling: AutoscalingPolicy, *, lead_time_s: float | None = None) -> Policy:
    """The policy a Model asks for, with its settings.

    Fields the user did not set (``model_fields_set``) take each policy's own defaults: the
    Model's generic window defaults (60 s / 6 s, Knative's) are not the 180 s / 60 s the KPA
    uses for LLM pods. ``lead_time_s`` is the pool's replica start-up time, when known (slo).
    """
    given = autoscaling.model_fields_set
    concurrency = autoscaling.target_concurrency
    if autoscaling.policy == "hpa":
        depth = autoscaling.target_queue_depth or DEFAULT_TARGET_QUEUE_DEPTH
        return HpaPolicy(depth)
    if autoscaling.policy == "kpa":
        return KpaPolicy(
            concurrency or DEFAULT_TARGET_CONCURRENCY,
            stable_window_s=(
                autoscaling.stable_window_s if "stable_window_s" in given else STABLE_WINDOW_S
            ),
            panic_window_s=(
                autoscaling.panic_window_s if "panic_window_s" in given else PANIC_WINDOW_S
            ),
            panic_threshold=autoscaling.panic_threshold,
            scale_down_delay_s=autoscaling.scale_down_delay_s,
        )
    if autoscaling.policy == "apa":
        return ApaPolicy(
            (concurrency or DEFAULT_TARGET_CONCURRENCY) * TARGET_UTILIZATION,
            window_s=autoscaling.stable_window_s,
        )
    # slo's own default delay is in start-up times (DEFAULT_DELAY_LEAD_TIMES), not the Model's
    # generic 300 s.
    delay = autoscaling.scale_down_delay_s if "scale_down_delay_s" in given else None
    if lead_time_s is not None:
        return SloPolicy(scale_down_delay_s=delay, lead_time_s=lead_time_s)
    return SloPolicy(scale_down_delay_s=delay)
