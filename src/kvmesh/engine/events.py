"""Block events: what every KV store (device pool, host, disk, later peers) gained or lost.

Pure Python. The block pool and the tier indexes append frozen events to one outbox as
they happen; the engine core drains it once per step (and before anything can overwrite
an evicted device block) and hands each batch, in order, to its subscribers: the
offloader today, a KV-event publisher for the router and the peer directory next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmesh.hashing import BlockKey

DEVICE = "device"


@dataclass(frozen=True, slots=True)
class BlockStored:
    """`medium` now holds `key` (device blocks also name their block id)."""

    medium: str
    key: BlockKey
    block_id: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """`medium` no longer holds `key`. A device block's bytes stay intact until the step
    that follows the drain writes it, so a subscriber may still copy them out."""

    medium: str
    key: BlockKey
    block_id: int | None = None


@dataclass(frozen=True, slots=True)
class AllCleared:
    """`medium` dropped everything it held (for example, a disk tier that was disabled)."""

    medium: str


BlockEvent = BlockStored | BlockRemoved | AllCleared
Subscriber = Callable[[Sequence[BlockEvent]], None]


class EventOutbox:
    """Events in the order they happened, handed to subscribers on `drain()`."""

    def __init__(self) -> None:
        self._events: list[BlockEvent] = []
        self._subscribers: list[Subscriber] = []
        self.last_error: Exception | None = None  # a subscriber's, for the owner to log

    def append(self, event: BlockEvent) -> None:
        self._events.append(event)

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def drain(self) -> int:
        """Hand pending events to every subscriber; events they cause are handed on too.
        A subscriber that raises misses nothing else and stops no other (`last_error`).

        Returns how many events were handed out.
        """
        total = 0
        while self._events:
            events, self._events = self._events, []
            for subscriber in self._subscribers:
                try:
                    subscriber(events)
                except Exception as exc:  # noqa: BLE001 - isolated; the owner logs it
                    self.last_error = exc
            total += len(events)
        return total
