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


def _blocking_exchange(stall_timeout_s: float) -> tuple[Exchange, asyncio.Event]:
    """An exchange whose ASGI send waits until `flowing` is set, as a server's flow control
    makes it wait for a client that does not read."""
    flowing = asyncio.Event()
    flowing.set()

    async def receive() -> dict:
        await asyncio.Event().wait()  # connected for good
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await flowing.wait()

    scope = {"path": "/v1/completions", "headers": []}
    return Exchange(scope, receive, send, stall_timeout_s), flowing


def test_a_send_that_waits_past_the_stall_timeout_drops_the_client():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ex, flowing = _blocking_exchange(0.1)
        await ex.write(b"a")  # sends that go through arm the guard; idle time is no stall
        await asyncio.sleep(0.3)
        await ex.write(b"b")
        assert not ex.is_stalled
        flowing.clear()
        start = loop.time()
        with pytest.raises(ClientGone):
            await ex.write(b"c")
        assert ex.is_stalled and 0.1 <= loop.time() - start < 1.0
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        ex.close()

    asyncio.run(main())


def test_a_stall_with_another_cancellation_stays_a_cancellation_and_zero_never_drops():
    async def main() -> None:
        ex, flowing = _blocking_exchange(5.0)
        flowing.clear()
        writer = asyncio.create_task(ex.write(b"x"))
        await asyncio.sleep(0.01)
        writer.cancel()  # a shutdown, long before the stall
        with pytest.raises(asyncio.CancelledError):
            await writer
        assert not ex.is_stalled
        ex.close()
        both, flowing = _blocking_exchange(5.0)
        flowing.clear()
        writer = asyncio.create_task(both.write(b"x"))
        await asyncio.sleep(0.01)
        assert both._sending is not None
        both._sending = (both._sending[0] - 10.0, both._sending[1])  # waited past 5 s
        writer.cancel()  # a shutdown in the same tick as the stall
        both._check_stall()
        assert both.is_stalled
        with pytest.raises(asyncio.CancelledError):  # the shutdown goes on
            await writer
        both.close()
        patient, flowing = _blocking_exchange(0.0)
        flowing.clear()
        waiter = asyncio.create_task(patient.write(b"x"))
        await asyncio.sleep(0.2)
        assert not waiter.done() and not patient.is_stalled
        flowing.set()
        await waiter

    asyncio.run(main())
