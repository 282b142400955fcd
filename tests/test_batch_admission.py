"""The in-flight limiter's semantics (plain asyncio, no Ray): bounded, keyed, idempotent."""

from __future__ import annotations

import asyncio

import pytest

from nvseg_ray.batch.admission import InFlightLimiter, default_in_flight


def test_default_bound_grows_with_the_actor_pool():
    assert [default_in_flight(n) for n in (1, 2, 8)] == [5, 8, 26]
    assert default_in_flight(1, cpu_task_slots=1) == 5 and default_in_flight(1, cpu_task_slots=16) == 19


def test_rejects_a_zero_limit():
    with pytest.raises(ValueError, match="limit must be >= 1"):
        InFlightLimiter(0)


def test_acquire_waits_for_a_release_and_keys_are_idempotent():
    async def scenario() -> list:
        lim = InFlightLimiter(2)
        events = []
        assert await lim.acquire("a") == 1
        assert await lim.acquire("b") == 2
        assert await lim.acquire("a") == 2  # a retried task re-acquiring its own slot never waits or counts twice

        async def third() -> None:
            await lim.acquire("c")
            events.append("c admitted")

        waiter = asyncio.ensure_future(third())
        await asyncio.sleep(0.05)
        events.append("c still waiting" if not waiter.done() else "c admitted early")
        await lim.release("a")
        await asyncio.wait_for(waiter, 1)
        await lim.release("a")  # a second release of the same key is a no-op
        await lim.release("never-held")
        events.append(await lim.stats())
        return events

    assert asyncio.run(scenario()) == ["c still waiting", "c admitted", {"limit": 2, "held": 2, "peak": 2}]
