"""Counters of one mesh node (mutated on the node's loop; read for metrics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MeshStats:
    fetches: int = 0
    fetch_timeouts: int = 0  # stalled (no block for fetch_stall_timeout_s) or past FETCH_CAP_S
    fetches_refused_busy: int = 0
    false_positives: int = 0  # blocks the directory listed that the holder lacked
    blocks_in: int = 0
    bytes_in: int = 0
    blocks_out: int = 0
    bytes_out: int = 0
    checksum_failures: int = 0
    handshakes_refused: int = 0
    bad_frames: int = 0
    deaths: int = 0
    blocks_given: int = 0  # handed to the members that stay, on leaving
    blocks_adopted: int = 0  # handed to this node by a member that left
