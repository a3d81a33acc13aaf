"""vnpu.jsonbody's turns: large jobs run one at a time on worker threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from vnpu.jsonbody import in_turn


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
