import pytest

from llmesh.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_probes_once_after_cooldown() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(cooldown_s=2.0, failure_threshold=3, clock=clock, on_change=lambda s, _: changes.append(s))
    breaker.record_failure("a")
    breaker.record_failure("b")
    assert breaker.allow() and breaker.closed
    breaker.record_failure("c")
    assert breaker.state is BreakerState.OPEN and breaker.last_error == "c"
    assert not breaker.allow()
    clock.now += 2.0
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # everyone else keeps skipping while the probe is out
    breaker.record_success()
    assert breaker.closed and breaker.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    assert breaker.transitions == 3


def test_failed_probe_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(cooldown_s=1.0, clock=clock)
    breaker.record_failure("down")
    clock.now += 1.0
    assert breaker.allow()
    clock.now += 0.5
    breaker.record_failure("still down")
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_lost_probe_lets_another_probe_after_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(cooldown_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()  # this probe never reports back
    clock.now += 1.0
    assert breaker.allow()


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(cooldown_s=1.0, failure_threshold=2, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.closed


def test_open_at_start_probes_on_first_call() -> None:
    breaker = CircuitBreaker(cooldown_s=5.0, clock=Clock(), open_at_start=True)
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=1.0, failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=-1.0)


def test_open_at_start_reports_the_initial_state() -> None:
    changes: list[tuple[BreakerState, str]] = []
    CircuitBreaker(cooldown_s=1.0, clock=Clock(), open_at_start=True, on_change=lambda s, r: changes.append((s, r)))
    assert changes == [(BreakerState.OPEN, "open at start")]


def test_background_probe_reports_without_allow() -> None:
    # The limiter's pattern: requests only check `closed`; a background task probes and reports directly.
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(cooldown_s=0.0, failure_threshold=3, clock=Clock(), open_at_start=True,
                             on_change=lambda s, _: changes.append(s))  # fmt: skip
    breaker.record_failure("refused")
    breaker.record_failure("refused again")
    assert breaker.state is BreakerState.OPEN and breaker.last_error == "refused again"
    breaker.record_success()
    assert breaker.closed
    assert changes == [BreakerState.OPEN, BreakerState.CLOSED] and breaker.transitions == 2
    breaker.record_failure("x")
    breaker.record_failure("y")
    assert breaker.closed  # the count started again after the success
