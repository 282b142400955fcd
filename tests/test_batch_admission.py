"""The in-flight window's semantics (plain Python, no Ray): bounded, keyed, idempotent, never blocking."""

from __future__ import annotations

import pytest

from nvseg_ray.batch.admission import InFlightWindow, default_in_flight


def test_default_bound_grows_with_the_actor_pool():
    assert [default_in_flight(n) for n in (1, 2, 8)] == [5, 8, 26]
    assert default_in_flight(1, cpu_task_slots=1) == 5 and default_in_flight(1, cpu_task_slots=16) == 19


def test_rejects_a_zero_limit():
    with pytest.raises(ValueError, match="limit must be >= 1"):
        InFlightWindow(0)


def test_acquire_refuses_when_full_and_keys_are_idempotent():
    win = InFlightWindow(2)
    assert win.acquire("a") and win.acquire("b")
    assert win.acquire("a")  # a key that holds a slot keeps it: never counted twice
    assert not win.has_room() and not win.acquire("c")  # full: refused at once, nothing waits
    assert win.release("a") == 1
    assert win.acquire("c")
    assert win.release("a") == 2  # a second release of the same key is a no-op
    win.release("never-held")
    assert win.stats() == {"limit": 2, "held": 2, "peak": 2}
