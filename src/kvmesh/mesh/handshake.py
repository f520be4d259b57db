"""Mutual challenge-response over the cluster secret (HMAC-SHA256). Pure.

    dialer  -> Hello(nonce_d)
    listener-> Challenge(nonce_l, mac("L", nonce_d, nonce_l))   the listener proves first
    dialer  -> Proof(mac("D", nonce_d, nonce_l), member)         then the dialer
    listener-> Welcome(member, members)                          only after both proofs

Both nonces are fresh per connection, so a recorded exchange replays to nothing. A side
that fails a proof closes the connection having revealed no membership, directory or block.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

NONCE_BYTES = 16
MIN_SECRET_BYTES = 16


def load_secret(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the cluster secret file {path}: {exc}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"cluster secret in {path} is {len(secret)} bytes; at least "
                         f"{MIN_SECRET_BYTES} are needed (e.g. `openssl rand -hex 32`)")
    return secret


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def mac(secret: bytes, role: bytes, nonce_d: bytes, nonce_l: bytes) -> bytes:
    return hmac.new(secret, role + nonce_d + nonce_l, hashlib.sha256).digest()


def verify(secret: bytes, role: bytes, nonce_d: bytes, nonce_l: bytes, got: bytes) -> bool:
    return hmac.compare_digest(mac(secret, role, nonce_d, nonce_l), got)
