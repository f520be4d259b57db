"""Disk tier: one checksummed file per block under a cache directory, with a byte cap.

- Writes go to a temp file in the same directory, then `os.replace`: a killed process
  leaves either the old state or a complete file, never a torn one under the final name.
  (`fsync=True` also survives power loss, at a cost.)
- The index is rebuilt from file names at start-up, so a restarted instance comes back
  warm; leftover temp files are removed.
- Reads verify the header and checksum; a bad file is deleted, counted, and is a miss.
- I/O runs on worker threads. The index is mutated on the engine thread only, in `poll()`.
- A write that fails with a full, read-only or unwritable disk disables the tier (logged
  once, reported in stats); serving goes on without it.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from kvmesh.engine.events import EventOutbox
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.codec import HEADER_BYTES, CorruptBlockError, decode, encode_header
from kvmesh.kvstore.index import TierIndex

log = logging.getLogger(__name__)
SUFFIX = ".kvb"
FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


def _file_key(name: str) -> BlockKey | None:
    stem = name.removesuffix(SUFFIX)
    if len(stem) != 32 or not name.endswith(SUFFIX):
        return None
    try:
        return BlockKey(bytes.fromhex(stem))
    except ValueError:
        return None


class DiskTier:
    name = "disk"
    writable = True
    lands_in_place = False

    def __init__(self, path: Path, capacity_bytes: int, block_bytes: int, policy: str = "lru",
                 io_threads: int = 4, fsync: bool = False, outbox: EventOutbox | None = None):
        self.root = Path(path)
        self.block_bytes = block_bytes
        self.file_bytes = block_bytes + HEADER_BYTES
        self.fsync = fsync
        self.max_queued_writes = 1024
        self.index = TierIndex("disk", capacity_bytes // self.file_bytes, self.file_bytes,
                               policy, outbox)
        self.stats = self.index.stats
        self._writing: set[BlockKey] = set()
        self._done: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvmesh-disk")
        self._lock = threading.Lock()
        self.disabled_reason: str | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._scan()
        except OSError as exc:
            self._disable(f"cannot use {self.root}: {exc}")

    # start-up --------------------------------------------------------------------------

    def _path(self, key: BlockKey) -> Path:
        return self.root / key.hex()[:2] / f"{key.hex()}{SUFFIX}"

    def _scan(self) -> None:
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                key = _file_key(f.name)
                if key is None:
                    f.unlink(missing_ok=True)  # temp files of a killed writer
                    continue
                self._admit(key)
        log.info("disk tier %s: %d blocks found", self.root, len(self.index))

    # engine thread ---------------------------------------------------------------------

    @property
    def is_enabled(self) -> bool:
        return self.disabled_reason is None

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def _admit(self, key: BlockKey) -> None:
        slot, evicted = self.index.insert(key)
        if evicted is not None:
            self._pool.submit(self._path(evicted[0]).unlink, missing_ok=True)
        if slot is None:  # a tier smaller than one file
            self._pool.submit(self._path(key).unlink, missing_ok=True)

    def _forget(self, key: BlockKey) -> None:
        self.index.remove(key)

    def write(self, key: BlockKey, payload: bytes) -> None:
        """Queue a block for writing (the caller hands over its own copy of the bytes)."""
        if not self.is_enabled or key in self.index or key in self._writing:
            return
        if len(self._writing) >= self.max_queued_writes:
            self.stats.dropped_writes += 1
            return
        self._writing.add(key)
        self._pool.submit(self._write_file, key, payload)

    def read_into(self, key: BlockKey, into: object) -> Future:
        return self.read(key)  # its bytes are copied in

    def read(self, key: BlockKey) -> Future:
        """Read and verify a block on a worker; the future's result is bytes or None."""
        self.index.touch(key)
        return self._pool.submit(self._read_file, key)

    def submit(self) -> None:
        pass  # each read is queued on the workers as it starts

    def poll(self) -> None:
        """Apply finished writes and read failures to the index (engine thread)."""
        while True:
            try:
                apply = self._done.get_nowait()
            except queue.Empty:
                return
            apply()

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for queued writes (tests and shutdown)."""
        self._pool.submit(lambda: None).result(timeout)
        import time

        deadline = time.monotonic() + timeout
        while self._writing and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.005)
        self.poll()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.poll()

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            log.warning("disk KV tier disabled: %s", reason)
        self.disabled_reason = reason
        self.stats.is_disabled = True
        self.index.clear()  # this process reads none of it any more (AllCleared event)

    # worker threads --------------------------------------------------------------------

    def _write_file(self, key: BlockKey, payload: bytes) -> None:
        final = self._path(key)
        tmp = final.parent / f".tmp-{key.hex()}-{threading.get_ident()}"
        try:
            final.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(encode_header(key, payload))
                f.write(payload)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            error: OSError = exc
            self._done.put(lambda: self._write_failed(key, error))
            return
        self._done.put(lambda: self._write_done(key))

    def _write_done(self, key: BlockKey) -> None:
        self._writing.discard(key)
        self.stats.bytes_in += self.file_bytes
        if self.is_enabled:
            self._admit(key)

    def _write_failed(self, key: BlockKey, exc: OSError) -> None:
        self._writing.discard(key)
        self.stats.write_errors += 1
        if exc.errno in FATAL_ERRNOS:
            self._disable(f"write failed: {exc}")
        else:
            log.warning("disk KV tier: write of one block failed: %s", exc)

    def _read_file(self, key: BlockKey) -> bytes | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
            payload = bytes(decode(key, blob, self.block_bytes))
        except FileNotFoundError:
            self._done.put(lambda: self._forget(key))
            return None
        except (CorruptBlockError, OSError) as exc:
            log.warning("disk KV tier: dropping block %s: %s", key.hex()[:12], exc)
            path.unlink(missing_ok=True)
            self._done.put(lambda: self._corrupt(key))
            return None
        self._done.put(lambda: self._count_out())
        return payload

    def _count_out(self) -> None:
        self.stats.bytes_out += self.file_bytes

    def _corrupt(self, key: BlockKey) -> None:
        self.stats.checksum_failures += 1
        self._forget(key)

    def check_integrity(self) -> None:
        self.index.check_integrity()
