"""vnpu's access log: probes and scrapes only when their status changes, client errors and every other
request always (the servers' wiring is tested with them: tests/runtime/test_server.py and
tests/integration/test_gateway.py)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web

from vnpu.accesslog import AccessLogger


def test_a_quiet_path_is_logged_when_its_status_changes_and_on_every_client_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    answers = [200, 200, 401, 401, 200, 503, 503, 200, 200]  # /metrics, in this order
    expected_logged = [200, 401, 401, 503, 200]  # a caller's 401 does not change the server's state

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(status=answers.pop(0))

    async def completions(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app, access_log_class=AccessLogger)  # as the servers make theirs
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
                for _ in range(len(answers)):
                    (await session.get("/metrics?ignored=1")).release()
                for _ in range(3):
                    (await session.post("/v1/completions")).release()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    metrics_lines = [line for line in lines if '"GET /metrics' in line]
    assert [int(line.split('"')[2].split()[0]) for line in metrics_lines] == expected_logged
    assert sum('"POST /v1/completions' in line for line in lines) == 3
