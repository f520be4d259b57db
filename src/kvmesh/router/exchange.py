"""One proxied HTTP exchange on raw ASGI: the router's hot path, without a web framework.

FastAPI's per-request stack (its middleware, route matching, a task group per streamed
response) costs about a millisecond a request on a slow core, as much as the rest of the
router together. The two proxied endpoints skip it; `/health`, `/metrics` and
`/v1/models` stay on FastAPI (`RouterASGI` picks).

After the request body has been read, one task waits on the ASGI `receive` for the
client's disconnect; inside `watching()` it cancels the request's task, so a wait for an
instance or for the next chunk of a stream ends as soon as the client leaves (no polling).
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


def _close_awaitable(aw: Awaitable[object]) -> None:
    close = getattr(aw, "close", None)  # a coroutine never awaited: no warning
    if callable(close):
        close()


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class Exchange:
    def __init__(self, scope: Scope, receive: Receive, send: Send):
        self.path: str = scope["path"]
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                        for k, v in scope["headers"]}
        self._receive = receive
        self._send = send
        self._gone: asyncio.Future[None] | None = None
        self.is_started = False

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


__all__ = ["ClientGone", "Exchange", "Receive", "Scope", "Send"]
