"""vnpu.jsonbody's turns: large jobs run one at a time, and rest for their share of the time."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from vnpu.jsonbody import in_turn


def _rests(loop: asyncio.AbstractEventLoop) -> list[float]:
    """The delays after which the loop's gate of large jobs is reopened, as they are scheduled."""
    rests: list[float] = []
    later = loop.call_later

    def recorded(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__name__", "") == "release":
            rests.append(delay)
        return later(delay, callback, *args, **kwargs)

    loop.call_later = recorded  # type: ignore[method-assign]
    return rests


def test_a_job_with_the_whole_time_reopens_the_gate_at_once_and_one_with_a_share_rests() -> None:
    async def main() -> None:
        rests = _rests(asyncio.get_running_loop())
        assert await in_turn(lambda: 1) == 1
        assert rests == []
        assert await in_turn(lambda: 2, share=0.25) == 2
        assert len(rests) == 1 and rests[0] > 0

    asyncio.run(main())


def test_a_failed_job_ends_its_turn_and_its_error_reaches_its_caller() -> None:
    def refused() -> None:
        raise ValueError("refused")

    async def main() -> None:
        with pytest.raises(ValueError, match="refused"):
            await in_turn(refused)
        assert await asyncio.wait_for(in_turn(lambda: "next"), 30) == "next"

    asyncio.run(main())


def test_a_caller_cancelled_while_its_job_runs_keeps_the_turn_until_the_job_ends() -> None:
    release = threading.Event()
    second_ran = threading.Event()

    async def main() -> None:
        first = asyncio.ensure_future(in_turn(release.wait))
        await asyncio.sleep(0)  # the first call takes the turn and starts its thread
        second = asyncio.ensure_future(in_turn(second_ran.set))
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert not second_ran.is_set()  # the thread still runs: the turn is still its
        release.set()
        await second
        assert second_ran.is_set()

    asyncio.run(main())
