"""The router's raw-ASGI exchange: a client's disconnect ends a wait at once and comes out
as `ClientGone`, while any other cancellation (a shutdown) still comes out as one. The
ASGI `receive` here is a plain coroutine, as a server would hand it over."""

from __future__ import annotations

import asyncio

import pytest

from kvmesh.router.exchange import ClientGone, Exchange
from kvmesh.server.errors import APIError


def _exchange(body: bytes = b"{}") -> tuple[Exchange, asyncio.Event, list[dict]]:
    left = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"path": "/v1/completions", "headers": [(b"X-Session-Id", b"s1")]}
    return Exchange(scope, receive, send), left, sent


def test_a_disconnect_ends_a_wait_and_every_later_one():
    async def main() -> None:
        ex, left, _ = _exchange()
        assert await ex.read_body(100) == b"{}"
        assert ex.headers["x-session-id"] == "s1"
        never = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, left.set)
        with pytest.raises(ClientGone):
            await ex.unless_gone(never)
        assert never.cancelled()
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # nothing left pending
        with pytest.raises(ClientGone):
            await ex.unless_gone(asyncio.sleep(10))
        await asyncio.sleep(0.01)  # a queued callback must not cancel us after the block
        ex.close()

    asyncio.run(main())


def test_another_cancellation_with_the_disconnect_stays_a_cancellation():
    async def main() -> None:
        ex, left, _ = _exchange()
        await ex.read_body(100)
        never = asyncio.get_running_loop().create_future()
        waiter = asyncio.create_task(ex.unless_gone(never))
        await asyncio.sleep(0.01)
        assert ex._gone is not None
        ex._gone.add_done_callback(lambda _: waiter.cancel())  # runs right after ours
        left.set()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert waiter.cancelled()
        ex.close()

    asyncio.run(main())


def test_a_body_over_the_limit_is_refused():
    async def main() -> None:
        ex, _, sent = _exchange(b"x" * 101)
        with pytest.raises(APIError) as err:
            await ex.read_body(100)
        assert err.value.status == 413
        await ex.respond_error(err.value)
        assert sent[0]["status"] == 413 and b"over 100 bytes" in sent[1]["body"]

    asyncio.run(main())
