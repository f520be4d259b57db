"""One framed, bounded TCP connection between two peers: an asyncio BufferedProtocol.

Small frames are parsed out of a staging buffer; a block payload (or a header too big for
the stage, like a directory snapshot) is received straight into its own buffer with
`recv_into`, so a block's bytes are copied once, by the kernel. The `landing` hook names
that buffer: for a fetched block, the host-tier slot reserved for it, so the block lands
where it will stay (no second copy, no fresh pages to fault in). The stage is small so
that little of a payload passes through it. Sizes are checked from the
8-byte prefix before anything is allocated. Sending writes the header and then the block's
own buffer (no re-packing), with the transport's flow control. Reading pauses while
MAX_QUEUED_FRAMES decoded frames wait for `recv`, so a slow consumer bounds memory.

`TcpTransport` is the one transport built; the node only uses `listen` and `dial`, so
another (RDMA through NIXL or UCX) can stand beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable

import numpy as np

from kvmesh.mesh import wire

STAGE_BYTES = 32 << 10
MAX_QUEUED_FRAMES = 64
SOCKET_BUFFER_BYTES = 4 << 20
MAX_UNSENT_BYTES = 256 << 20  # a peer this far behind is not reading
Payload = bytes | bytearray | memoryview


class Link(asyncio.BufferedProtocol):
    def __init__(self, on_connect: Callable[[Link], None] | None = None,
                 socket_buffer_bytes: int = SOCKET_BUFFER_BYTES):
        self.socket_buffer_bytes = socket_buffer_bytes
        self.authenticated = False
        self.closed = False
        self.frames_sent = 0
        self._on_connect = on_connect
        self._transport: asyncio.Transport | None = None
        self._frames: deque[tuple[wire.Message, Payload]] = deque()
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drained: list[asyncio.Future] = []
        self._stage = bytearray(STAGE_BYTES)
        self._start = self._end = 0  # unparsed bytes in the stage
        self._sizes: tuple[int, int] | None = None  # the current frame's prefix
        self._msg: wire.Message | None = None  # its header, while its payload arrives
        self._target: memoryview | None = None  # a part received straight into its buffer
        self._got = 0
        # Where a payload goes, given its header and size (None: the link's own buffer).
        self.landing: Callable[[wire.Message, int], memoryview | None] | None = None

    # receiving -------------------------------------------------------------------------

    async def recv(self) -> tuple[wire.Message, Payload]:
        """One frame. Raises FrameError (bad frame) or ConnectionError (closed)."""
        while not self._frames:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        frame = self._frames.popleft()
        if self._reading_paused and len(self._frames) <= MAX_QUEUED_FRAMES // 2:
            self._reading_paused = False
            if self._transport is not None and not self.closed:
                self._transport.resume_reading()
        return frame

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._got:]
        if len(self._stage) - self._end < STAGE_BYTES // 4:
            self._compact()
        return memoryview(self._stage)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._target is not None:
                self._got += nbytes
                if self._got == len(self._target):
                    part, self._target = self._target, None
                    self._part_done(part)
            else:
                self._end += nbytes
            self._parse()
        except wire.FrameError as exc:
            self._fail(exc)
            self.close()

    def _parse(self) -> None:
        while self._target is None and not self.closed:
            have = self._end - self._start
            if self._sizes is None:
                if have < wire.PREFIX.size:
                    return
                self._sizes = wire.PREFIX.unpack_from(self._stage, self._start)
                wire.check_sizes(*self._sizes, self.authenticated)
                self._start += wire.PREFIX.size
                continue
            need = self._sizes[1] if self._msg is not None else self._sizes[0]
            into = (self.landing(self._msg, need)
                    if self._msg is not None and self.landing is not None else None)
            if into is not None:  # the payload's own place (a host slot): received there
                self._receive_into(into, have)
            elif have >= need:
                part = self._stage[self._start:self._start + need]
                self._start += need
                self._part_done(part)
            elif need > len(self._stage) // 2:  # big: straight into its own buffer
                # np.empty: no zero-fill pass (a bytearray's memset costs as much as the
                # kernel's copy); its pages are first touched by recv_into itself.
                self._receive_into(np.empty(need, np.uint8).data, have)
            else:
                return

    def _receive_into(self, buf: memoryview, have: int) -> None:
        """The current part goes into `buf`: what the stage holds of it now, the rest by
        `recv_into` straight from the kernel."""
        n = min(have, len(buf))
        buf[:n] = memoryview(self._stage)[self._start:self._start + n]
        self._start += n
        if n == len(buf):
            self._part_done(buf)
        else:
            self._target, self._got = buf, n
            self._start = self._end = 0

    def divert(self, pred: Callable[[wire.Message], bool]) -> None:
        """If the payload being received belongs to a header that `pred` picks, the rest
        of it goes to a scratch buffer instead of its own (whose reader gave up on it)."""
        if self._target is not None and self._msg is not None and pred(self._msg):
            self._target = np.empty(len(self._target), np.uint8).data

    def _part_done(self, part: bytearray | memoryview) -> None:
        assert self._sizes is not None
        if self._msg is None:
            msg = wire.decode(bytes(part), self._sizes[1])
            if self._sizes[1]:
                self._msg = msg
                return
            self._deliver(msg, b"")
        else:
            self._deliver(self._msg, part)
            self._msg = None
        self._sizes = None

    def _deliver(self, msg: wire.Message, payload: Payload) -> None:
        self._frames.append((msg, payload))
        self._wake()
        if len(self._frames) >= MAX_QUEUED_FRAMES and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def _compact(self) -> None:
        have = self._end - self._start
        self._stage[:have] = self._stage[self._start:self._end]
        self._start, self._end = 0, have

    # sending ---------------------------------------------------------------------------

    async def send(self, msg: wire.Message, payload: bytes | bytearray | memoryview = b""
                   ) -> None:
        if self.closed or self._transport is None:
            raise ConnectionError("link closed")
        # One frame is written whole before any await, so frames from concurrent senders
        # never interleave; the payload is the block's own buffer (no re-packing copy).
        self._transport.write(wire.encode(msg, len(payload)))
        self.frames_sent += 1
        if payload:
            self._transport.write(payload)
        await self._drain()

    def post(self, msg: wire.Message) -> None:
        """A small control frame, written without waiting for the peer to read: a reader
        loop answers with it and goes on reading, so two links that are full both ways
        cannot deadlock. A peer that stops reading altogether is cut off."""
        if self.closed or self._transport is None:
            return
        self._transport.write(wire.encode(msg))
        self.frames_sent += 1
        if self._transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.close()

    async def _drain(self) -> None:
        if self._writing_paused:
            fut = asyncio.get_running_loop().create_future()
            self._drained.append(fut)
            await fut

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._release_writers(None)

    def _release_writers(self, exc: BaseException | None) -> None:
        drained, self._drained = self._drained, []
        for fut in drained:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)

    # the connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a block fits the kernel's buffer: sent without a user copy
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer_bytes)
        if self._on_connect is not None:
            self._on_connect(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionResetError(f"link closed: {exc}" if exc else "link closed"))
        self._release_writers(ConnectionResetError("link closed"))

    def eof_received(self) -> bool:
        return False  # close: a half-open link is of no use

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._fail(ConnectionResetError("link closed"))
            self._release_writers(ConnectionResetError("link closed"))
            if self._transport is not None:
                self._transport.close()

    @property
    def peer_addr(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"


class TcpTransport:
    """Links over TCP: a listener that hands each accepted link to `on_link`, and dialing."""

    @staticmethod
    async def listen(host: str, port: int, on_link: Callable[[Link], None],
                     buffer_bytes: int = SOCKET_BUFFER_BYTES) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: Link(on_link, buffer_bytes), host, port)

    @staticmethod
    async def dial(host: str, port: int, buffer_bytes: int = SOCKET_BUFFER_BYTES) -> Link:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(lambda: Link(None, buffer_bytes), host, port)
        return link
