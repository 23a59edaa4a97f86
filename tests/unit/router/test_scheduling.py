"""The router's request for a short scheduler slice (router/scheduling.py)."""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

from shoal.router.config import ConfigError, RouterConfig
from shoal.router.scheduling import LinuxSchedCalls, SchedAttr, SliceOutcome, request_slice

T = TypeVar("T")


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def _in_fresh_thread(fn: Callable[[], T]) -> T:
    """Scheduler attributes are per thread: change a throwaway one, not the test runner's."""
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return box[0]


linux_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="sched_setattr is wired for Linux on x86_64 and aarch64",
)


@linux_only
def test_the_kernel_gives_the_thread_the_slice_it_asked_for() -> None:
    def ask() -> tuple[SliceOutcome, SchedAttr]:
        outcome = request_slice(250)
        return outcome, LinuxSchedCalls().get()

    outcome, attr = _in_fresh_thread(ask)
    if _kernel_at_least(6, 12):
        assert outcome.slice_us == 250, outcome.message
        assert attr.runtime_ns == 250_000
    else:  # the call is accepted and ignored: said so, not claimed
        assert outcome.slice_us == 0
        assert "6.12" in outcome.message


@linux_only
def test_the_nice_value_and_policy_are_kept() -> None:
    def ask() -> tuple[SliceOutcome, SchedAttr]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 7)  # this thread only
        outcome = request_slice(300)
        return outcome, LinuxSchedCalls().get()

    outcome, attr = _in_fresh_thread(ask)
    assert attr.nice == 7
    assert attr.policy == 0
    if _kernel_at_least(6, 12):
        assert outcome.slice_us == 300


class FakeCalls:
    """Stands in for a kernel that behaves differently from this machine's."""

    def __init__(self, attr: SchedAttr, *, ignore: bool = False, refuse: int = 0) -> None:
        self.attr = attr
        self.ignore = ignore
        self.refuse = refuse
        self.sets: list[SchedAttr] = []

    def get(self) -> SchedAttr:
        return self.attr

    def set(self, attr: SchedAttr) -> None:
        if self.refuse:
            raise OSError(self.refuse, f"sched_setattr: {os.strerror(self.refuse)}")
        self.sets.append(attr)
        if not self.ignore:
            self.attr = attr


def test_a_kernel_that_ignores_the_slice_is_reported_not_trusted() -> None:
    calls = FakeCalls(SchedAttr(0, 0, 0), ignore=True)
    outcome = request_slice(100, calls)
    assert outcome.slice_us == 0
    assert "ignored" in outcome.message and "6.12" in outcome.message


def test_a_refused_call_keeps_the_default_and_says_why() -> None:
    outcome = request_slice(100, FakeCalls(SchedAttr(0, 0, 0), refuse=1))  # EPERM (seccomp)
    assert outcome.slice_us == 0
    assert "Operation not permitted" in outcome.message


def test_a_real_time_thread_is_left_alone() -> None:
    calls = FakeCalls(SchedAttr(1, 0, 0))  # SCHED_FIFO
    outcome = request_slice(100, calls)
    assert outcome.slice_us == 0 and "policy 1" in outcome.message
    assert calls.sets == []


def test_the_request_keeps_policy_and_nice() -> None:
    calls = FakeCalls(SchedAttr(3, 5, 2_800_000))  # SCHED_BATCH, nice 5
    assert request_slice(100, calls).slice_us == 100
    assert calls.sets == [SchedAttr(3, 5, 100_000)]


def test_slices_outside_the_kernels_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match=r"100\.\.100000"):
        request_slice(50, FakeCalls(SchedAttr(0, 0, 0)))
    with pytest.raises(ConfigError, match="scheduler_slice_us must be 0"):
        RouterConfig.from_mapping({"scheduler_slice_us": 50})
    with pytest.raises(ConfigError, match="scheduler_slice_us"):
        RouterConfig.from_mapping({"scheduler_slice_us": 200_000})
    assert RouterConfig.from_mapping({"scheduler_slice_us": 0}).scheduler_slice_us == 0
    assert RouterConfig.from_mapping({}).scheduler_slice_us == 100
