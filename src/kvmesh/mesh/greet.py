"""The two halves of the handshake (`handshake.py`) run over a link: the dialer's and the
listener's. Each raises PermissionError on a wrong secret, FrameError on a wrong message."""

from __future__ import annotations

from kvmesh.mesh import handshake, wire
from kvmesh.mesh.link import Link


async def dial_side(link: Link, secret: bytes, me: wire.Member) -> wire.Welcome:
    mine = handshake.nonce()
    await link.send(wire.Hello(wire.PROTOCOL_VERSION, mine))
    msg, _ = await link.recv()
    if not isinstance(msg, wire.Challenge):
        raise wire.FrameError(f"expected a challenge, got {type(msg).__name__}")
    if not handshake.verify(secret, b"L", mine, msg.nonce, msg.mac):
        raise PermissionError("the peer does not know the cluster secret")
    link.authenticated = True  # the listener proved the secret; its Welcome may be large
    await link.send(wire.Proof(handshake.mac(secret, b"D", mine, msg.nonce), me))
    msg, _ = await link.recv()
    if not isinstance(msg, wire.Welcome):
        raise wire.FrameError(f"expected a welcome, got {type(msg).__name__}")
    return msg


async def listen_side(link: Link, secret: bytes) -> wire.Member:
    """Verify the dialer; the caller sends the Welcome."""
    msg, _ = await link.recv()
    if not isinstance(msg, wire.Hello) or msg.version != wire.PROTOCOL_VERSION \
            or len(msg.nonce) != handshake.NONCE_BYTES:
        raise wire.FrameError("expected a hello of this protocol version")
    mine = handshake.nonce()
    await link.send(wire.Challenge(mine, handshake.mac(secret, b"L", msg.nonce, mine)))
    proof, _ = await link.recv()
    if not isinstance(proof, wire.Proof):
        raise wire.FrameError("expected a proof")
    if not handshake.verify(secret, b"D", msg.nonce, mine, proof.mac):
        raise PermissionError("wrong cluster secret")
    link.authenticated = True
    return proof.member
