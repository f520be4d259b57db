"""One proxied HTTP exchange on raw ASGI: the router's hot path, without a web framework.

FastAPI's per-request stack (its middleware, route matching, a task group per streamed
response) costs about a millisecond a request on a slow core, as much as the rest of the
router together. The two proxied endpoints skip it; `/health`, `/metrics` and
`/v1/models` stay on FastAPI (`RouterASGI` picks).

After the request body has been read, one task waits on the ASGI `receive` for the
client's disconnect; inside `watching()` it cancels the request's task, so a wait for an
instance or for the next chunk of a stream ends as soon as the client leaves (no polling).

A client that stays connected but stops reading makes a send wait (the server's flow
control) without end, and its request would hold an instance's slot for good. With
`stall_timeout_s`, a send that has waited that long ends as `ClientGone` (the caller then
closes the instance's connection, which aborts the request there). One timer per
exchange, armed by a send and at most once per `stall_timeout_s`: a send itself only
reads the clock and notes that it is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from http import HTTPStatus
from typing import Any, TypeVar

from kvmesh.server.errors import APIError, error_body

T = TypeVar("T")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


CANCEL_MSG = "kvmesh: the client disconnected"
STALL_MSG = "kvmesh: the client stopped reading"


def _close_awaitable(aw: Awaitable[object]) -> None:
    close = getattr(aw, "close", None)  # a coroutine never awaited: no warning
    if callable(close):
        close()


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class Exchange:
    def __init__(self, scope: Scope, receive: Receive, send: Send,
                 stall_timeout_s: float = 0.0):
        """`stall_timeout_s`: the longest one send to the client may wait (0: no limit)."""
        self.path: str = scope["path"]
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                        for k, v in scope["headers"]}
        self._receive = receive
        self._send_asgi = send
        self._gone: asyncio.Future[None] | None = None
        self.is_started = False
        self.stall_timeout_s = stall_timeout_s
        self.is_stalled = False  # a send waited past stall_timeout_s: the client is dropped
        self._sending: tuple[float, asyncio.Task[Any]] | None = None  # since, by whom
        self._guard: asyncio.TimerHandle | None = None

    async def read_body(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"request body is over {limit} bytes",
                               err_type="invalid_request_error")
            parts.append(chunk)
            if not msg.get("more_body"):
                break
        self._gone = asyncio.ensure_future(self._until_disconnect())
        return b"".join(parts)

    async def _until_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass

    @property
    def is_gone(self) -> bool:
        return self._gone is not None and self._gone.done()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Within the block, the client's disconnect cancels the current task and comes
        out as `ClientGone`: a wait for an instance, or a relay between chunks, ends at
        once. No task or `asyncio.wait` per use (this runs several times a request)."""
        gone = self._gone
        if gone is None:
            yield
            return
        if gone.done():
            raise ClientGone
        task = asyncio.current_task()
        assert task is not None
        state = {"armed": True, "fired": False}

        def cancel(_: object) -> None:
            if state["armed"]:  # queued callbacks may run after the block has ended
                state["fired"] = True
                task.cancel(CANCEL_MSG)

        gone.add_done_callback(cancel)
        try:
            yield
        except asyncio.CancelledError:
            # ours alone: the client left; with another cancellation (shutdown) as well,
            # that one goes on
            if state["fired"] and task.uncancel() == 0:
                raise ClientGone from None
            raise
        finally:
            state["armed"] = False
            gone.remove_done_callback(cancel)

    async def unless_gone(self, aw: Awaitable[T]) -> T:
        """Await `aw`, but cancel it and raise `ClientGone` if the client leaves first."""
        if self.is_gone:
            _close_awaitable(aw)
            raise ClientGone
        with self.watching():
            return await aw

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        if self.stall_timeout_s <= 0:
            await self._send_asgi(message)
            return
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        if self._guard is None:
            self._guard = loop.call_later(self.stall_timeout_s, self._check_stall)
        self._sending = (loop.time(), task)
        try:
            await self._send_asgi(message)
        except asyncio.CancelledError:
            # ours alone: the client stopped reading; with another cancellation as well
            # (a shutdown), that one goes on
            if self.is_stalled and task.uncancel() == 0:
                raise ClientGone from None
            raise
        finally:
            self._sending = None

    def _check_stall(self) -> None:
        """The guard's timer: drop the client if the send in progress started
        `stall_timeout_s` ago, else wait for the rest of its time. No send in progress:
        the next one arms the timer again."""
        self._guard = None
        if self._sending is None or self.is_stalled:
            return
        since, task = self._sending
        loop = asyncio.get_running_loop()
        waited = loop.time() - since
        if waited >= self.stall_timeout_s:
            self.is_stalled = True
            task.cancel(STALL_MSG)
        else:
            self._guard = loop.call_later(self.stall_timeout_s - waited, self._check_stall)

    async def start(self, status: int, headers: Mapping[str, str]) -> None:
        self.is_started = True
        await self._send({"type": "http.response.start", "status": status, "headers": [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]})

    async def write(self, chunk: bytes) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b""})

    async def respond(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        await self.start(status, {**headers, "content-length": str(len(body))})
        await self._send({"type": "http.response.body", "body": body})

    async def respond_error(self, exc: APIError) -> None:
        body = error_body(exc.status, exc.message, exc.err_type, exc.param)
        await self.respond(exc.status, json.dumps(body).encode(),
                           {"content-type": "application/json", **exc.headers})

    def close(self) -> None:
        if self._gone is not None:
            self._gone.cancel()
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None


__all__ = ["ClientGone", "Exchange", "Receive", "Scope", "Send"]
