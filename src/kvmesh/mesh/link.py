"""One framed, bounded TCP connection between two peers (asyncio streams)."""

from __future__ import annotations

import asyncio

from kvmesh.mesh import wire


class Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.authenticated = False
        self.closed = False

    async def recv(self) -> tuple[wire.Message, bytes]:
        """One frame. Raises FrameError (bad frame) or ConnectionError/IncompleteReadError."""
        prefix = await self.reader.readexactly(wire.PREFIX.size)
        header_len, payload_len = wire.PREFIX.unpack(prefix)
        wire.check_sizes(header_len, payload_len, self.authenticated)
        header = await self.reader.readexactly(header_len)
        msg = wire.decode(header, payload_len)
        payload = await self.reader.readexactly(payload_len) if payload_len else b""
        return msg, payload

    async def send(self, msg: wire.Message, payload: bytes | memoryview = b"") -> None:
        if self.closed:
            raise ConnectionError("link closed")
        self.writer.write(wire.encode(msg, len(payload)))
        if payload:
            self.writer.write(payload)  # the block's own buffer: no re-packing copy
        await self.writer.drain()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    @property
    def peer_addr(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "?"
