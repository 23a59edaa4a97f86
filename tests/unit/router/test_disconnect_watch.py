"""A client that leaves cancels its request's task, under Shoal's server protocol (a connection
callback) and under any other ASGI server (a task waiting on receive), and only while guarded."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from shoal.router.passthrough import DisconnectWatch
from shoal.router.server_protocol import ConnectionWatch


async def _forever() -> None:
    await asyncio.sleep(3600)


def _receive_disconnect_after(delay_s: float) -> Any:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(delay_s)
        return {"type": "http.disconnect"}

    return receive


async def _never_receive() -> dict[str, Any]:
    raise AssertionError("the connection callback path must not read receive()")


def test_connection_callback_cancels_the_guarded_request_and_is_absorbed() -> None:
    async def run() -> None:
        conn = ConnectionWatch()
        request = asyncio.get_running_loop().create_task(_forever())
        watch = DisconnectWatch(_never_receive, request, conn)
        watch.guard(True)
        assert conn.listeners  # registered while the request runs
        conn.connection_lost()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        assert watch.cancelled_request and watch.absorb_cancellation()
        await watch.close()
        assert not conn.listeners

    asyncio.run(run())


def test_receive_task_cancels_the_guarded_request_under_another_server() -> None:
    async def run() -> None:
        request = asyncio.get_running_loop().create_task(_forever())
        watch = DisconnectWatch(_receive_disconnect_after(0.01), request)
        watch.guard(True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(request, 2)
        assert request.cancelled() and watch.cancelled_request
        await watch.close()

    asyncio.run(run())


def test_a_disconnect_after_the_response_or_after_close_cancels_nothing() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        conn = ConnectionWatch()
        request = loop.create_task(_forever())
        watch = DisconnectWatch(_never_receive, request, conn)
        watch.guard(True)
        watch.guard(False)  # the response is complete: leaving now is the normal end
        conn.connection_lost()
        await asyncio.sleep(0)
        assert not request.cancelled() and not watch.cancelled_request
        assert not watch.absorb_cancellation()  # a cancellation now is someone else's
        await watch.close()

        conn = ConnectionWatch()  # the next request on a keep-alive connection
        second = DisconnectWatch(_never_receive, request, conn)
        second.guard(True)
        await second.close()  # done before the client left
        conn.connection_lost()
        await asyncio.sleep(0)
        assert not request.cancelled()
        request.cancel()

    asyncio.run(run())


def test_a_connection_lost_before_the_request_listened_cancels_it_when_guarded() -> None:
    async def run() -> None:
        conn = ConnectionWatch()
        conn.connection_lost()
        request = asyncio.get_running_loop().create_task(_forever())
        watch = DisconnectWatch(_never_receive, request, conn)
        watch.guard(True)
        with contextlib.suppress(asyncio.CancelledError):
            await request
        assert watch.cancelled_request
        await watch.close()

    asyncio.run(run())
