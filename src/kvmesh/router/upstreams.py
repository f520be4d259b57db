"""The instances behind the router: health and load probes, and their KV-event feeds.

Runs on the router's event loop. Each instance is probed every `poll_interval_s` (`GET
/load` on kvmesh, `GET /health` on any other server): a failed probe or a failed request
takes it out of rotation, the next good probe brings it back. A restarted instance (a
new `instance_id`) loses whatever the router believed it held.

With mesh discovery on, the router also reads each healthy instance's `GET /mesh` every
`discover_interval_s` and adds the members it does not know yet (by HTTP URL, alive ones
only); from then on they are probed like the instances it was given. One whose
`/load` names an `instance_id` the router already knows (a seed under another spelling
of its URL) is not added twice. A member that leaves the mesh drops out of rotation when
its probes fail; a discovered one (never an instance given with `--instances`) that has
been out of rotation for `forget_after_s` (12 /mesh intervals, at least 60 s) and that no
healthy instance lists in the latest read of /mesh, under any URL the router knows it by,
is forgotten (its probes, KV feed, index entries and metrics go), so a mesh whose members
come and go does not leave the router probing every URL it ever saw. It is found again
if it comes back. `on_change(instance, joined)` tells the router's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import zmq
import zmq.asyncio

from kvmesh.engine.kv_events import KVEventBatch, KVSnapshot
from kvmesh.router.policies import InstanceLoad, RouterState

log = logging.getLogger(__name__)
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)  # what a failed instance raises
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
SNAPSHOT_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=2.0, sock_read=10.0)  # any size
SUBSCRIBE_SETTLE_S = 0.2  # let a new SUB connection subscribe before the snapshot


@dataclass
class Instance:
    number: int
    url: str
    is_healthy: bool = False
    is_kvmesh: bool = False
    num_running: int = 0  # reported, beyond the router's own in-flight requests
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_in_flight: int = 0
    reported_prefill_tokens: int = 0  # queued prefill, as the last /load said
    probe_epoch: int = 0  # /load probes sent so far
    # predicted prefill of requests sent since, not yet answered: epoch at send -> tokens
    sent_prefill: dict[int, int] = field(default_factory=dict)
    instance_id: str | None = None
    kv_events_port: int | None = None
    key_scheme: tuple[str, str, str, int] | None = None
    last_change_s: float = 0.0
    discovered: bool = False  # found through /mesh, not given with --instances
    out_reason: str = ""  # the kind of failure that keeps it out ("" while in)

    def load(self) -> InstanceLoad:
        return InstanceLoad(self.num_running, self.num_waiting, self.kv_usage, self.number,
                            self.num_in_flight,
                            self.reported_prefill_tokens + sum(self.sent_prefill.values()))

    def add_prefill(self, tokens: int) -> int:
        """A request sent now, whose prefill is `tokens`: counted until it is answered or a
        report taken after it arrives. Returns the epoch to `drop_prefill` it with."""
        if tokens > 0:
            self.sent_prefill[self.probe_epoch] = (
                self.sent_prefill.get(self.probe_epoch, 0) + tokens)
        return self.probe_epoch

    def drop_prefill(self, epoch: int, tokens: int) -> None:
        """The request's first byte is back (or it failed): its prefill is done."""
        left = self.sent_prefill.get(epoch, 0) - tokens
        if left > 0:
            self.sent_prefill[epoch] = left
        else:
            self.sent_prefill.pop(epoch, None)

    def report_prefill(self, tokens: int, epoch: int) -> None:
        """A /load answer to probe `epoch`: it counts the requests sent before the probe."""
        self.reported_prefill_tokens = max(0, tokens)
        for e in [e for e in self.sent_prefill if e < epoch]:
            del self.sent_prefill[e]

    def set_healthy(self, healthy: bool, reason: str = "") -> None:
        """Into or out of rotation; logged on a change, and while out on a new kind of
        failure (so an instance that never came in says why; the same failure again is
        not logged on every probe)."""
        kind = reason.split(":")[0].split("(")[0].strip() or "out"
        if healthy != self.is_healthy or (not healthy and kind != self.out_reason):
            log.warning("instance %s %s%s", self.url, "is back" if healthy else "is out",
                        f": {reason}" if reason else "")
        if healthy != self.is_healthy:
            self.is_healthy = healthy
            self.last_change_s = time.monotonic()
        self.out_reason = "" if healthy else kind


class Upstreams:
    def __init__(self, urls: tuple[str, ...], state: RouterState,
                 session: aiohttp.ClientSession, poll_interval_s: float,
                 discover_interval_s: float | None = None, api_key: str | None = None):
        self.instances = [Instance(i, u.rstrip("/")) for i, u in enumerate(urls)]
        # for the router's own GETs (/load, /kv/snapshot, /mesh) of instances with API keys
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._next_number = len(self.instances)
        self._aliases: dict[str, int] = {}  # other spellings of a known instance's URL
        self.on_change: Callable[[Instance, bool], None] | None = None  # (it, joined)
        self.state = state
        self.session = session
        self.poll_interval_s = poll_interval_s
        self.discover_interval_s = discover_interval_s
        self._tasks: list[asyncio.Task] = []
        self._polls: dict[int, asyncio.Task] = {}
        self._feeds: dict[int, asyncio.Task] = {}
        self._ctx = zmq.asyncio.Context()
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)

    def healthy(self) -> list[Instance]:
        return [i for i in self.instances if i.is_healthy]

    def key_scheme(self) -> tuple[str, str, str, int] | None:
        return next((i.key_scheme for i in self.instances if i.key_scheme), None)

    async def start(self) -> None:
        await asyncio.gather(*(self.probe(i) for i in self.instances))
        self._polls = {i.number: asyncio.create_task(self._poll(i)) for i in self.instances}
        if self.discover_interval_s is not None:
            await self.discover()
            self._tasks.append(asyncio.create_task(self._discover_loop(self.discover_interval_s)))

    async def close(self) -> None:
        tasks = [*self._tasks, *self._polls.values(), *self._feeds.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._ctx.destroy(linger=0)

    async def _poll(self, inst: Instance) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.probe(inst)

    async def _discover_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.discover()

    async def discover(self) -> list[Instance]:
        """Add the mesh members that the healthy instances list and the router does not
        know yet, and forget the discovered ones long gone (module docstring); returns the
        added ones."""
        known = {i.url for i in self.instances} | self._aliases.keys()
        added: list[Instance] = []
        listed: set[str] | None = None  # None: no instance answered, so nothing is known
        for inst in self.healthy():
            try:
                status, body = await self.get(inst.url + "/mesh", PROBE_TIMEOUT)
                urls = mesh_urls(json.loads(body)) if status == 200 else []
            except Exception as exc:  # noqa: BLE001 - a bad answer: try again next time
                log.debug("GET %s/mesh failed: %s", inst.url, exc)
                continue
            listed = (listed or set()) | set(urls)
            for url in urls:
                if url not in known:
                    known.add(url)
                    added.append(Instance(self._next_number, url, discovered=True,
                                          last_change_s=time.monotonic()))
                    self._next_number += 1
        for new in added:
            await self._join(new)
        if listed is not None and self.discover_interval_s is not None:
            aliased = {self._aliases[u] for u in listed if u in self._aliases}
            listed |= {i.url for i in self.instances if i.number in aliased}
            for gone in forgettable(self.instances, listed, time.monotonic(),
                                    forget_after_s(self.discover_interval_s)):
                self._forget(gone)
        return [i for i in added if i in self.instances]

    async def _join(self, new: Instance) -> None:
        await self.probe(new)
        same = next((i for i in self.instances if new.instance_id is not None
                     and i.instance_id == new.instance_id), None)
        if same is not None:  # a known instance under another URL: not a second one
            self._aliases[new.url] = same.number
            feed = self._feeds.pop(new.number, None)
            if feed is not None:
                feed.cancel()
            return
        log.warning("instance %s joins from the mesh", new.url)
        self.instances.append(new)
        self._polls[new.number] = asyncio.create_task(self._poll(new))
        if self.on_change is not None:
            self.on_change(new, True)

    def _forget(self, inst: Instance) -> None:
        log.warning("instance %s has left the mesh: forgotten", inst.url)
        self.instances.remove(inst)
        for task in (self._polls.pop(inst.number, None), self._feeds.pop(inst.number, None)):
            if task is not None:
                task.cancel()
        self._forget_blocks(inst.number)
        self._aliases = {u: n for u, n in self._aliases.items() if n != inst.number}
        if self.on_change is not None:
            self.on_change(inst, False)

    def _forget_blocks(self, number: int) -> None:
        """What the indexes believed instance `number` held."""
        self.state.prefix.forget(number)
        self.state.kv.forget(number)

    async def get(self, url: str, timeout: aiohttp.ClientTimeout) -> tuple[int, bytes]:
        """GET `url` whole: its status and body."""
        async with self.session.get(url, timeout=timeout, allow_redirects=False,
                                    headers=self._headers) as r:
            return r.status, await r.read()

    async def probe(self, inst: Instance) -> None:
        inst.probe_epoch += 1
        epoch = inst.probe_epoch
        try:
            status, body = await self.get(inst.url + "/load", PROBE_TIMEOUT)
            if status == 404:  # not kvmesh: any server with /health
                status, _ = await self.get(inst.url + "/health", PROBE_TIMEOUT)
                inst.is_kvmesh = False
                inst.set_healthy(status == 200, f"HTTP {status}")
                return
            if status != 200:
                why = (" (the instance wants an API key: --upstream-api-key)"
                       if status == 401 else "")
                inst.set_healthy(False, f"HTTP {status}{why}")
                return
            load = json.loads(body)
            if not isinstance(load, dict):
                raise ValueError("/load did not answer a JSON object")
            self._update(inst, load, epoch)
        except Exception as exc:  # noqa: BLE001 - any failed probe: out, and keep probing
            inst.set_healthy(False, f"{type(exc).__name__}: {exc}")

    def _update(self, inst: Instance, load: dict[str, Any], epoch: int) -> None:
        inst.is_kvmesh = True
        running, waiting = int(load.get("num_running") or 0), int(load.get("num_waiting") or 0)
        others = max(0, running + waiting - inst.num_in_flight)  # not sent by this router
        inst.num_waiting = min(waiting, others)
        inst.num_running = others - inst.num_waiting
        inst.kv_usage = float(load.get("kv_usage") or 0.0)
        inst.report_prefill(int(load.get("num_prefill_tokens") or 0), epoch)
        scheme = load.get("key_scheme")
        if isinstance(scheme, list) and len(scheme) == 3:
            model_id, kv_dtype, layout = (str(x) for x in scheme)
            inst.key_scheme = (model_id, kv_dtype, layout, int(load.get("block_size", 16)))
        if load.get("instance_id") != inst.instance_id:
            if inst.instance_id is not None:  # restarted: what we knew of it is gone
                self._forget_blocks(inst.number)
            inst.instance_id = load.get("instance_id")
        port = load.get("kv_events_port")
        feed = self._feeds.get(inst.number)
        if port and (feed is None or feed.done() or int(port) != inst.kv_events_port):
            if feed is not None:
                feed.cancel()  # a feed that died, or an instance back on another port
            inst.kv_events_port = int(port)
            self.state.has_kv_events = True
            self._feeds[inst.number] = asyncio.create_task(self._feed(inst))
        inst.set_healthy(True)

    # KV events -------------------------------------------------------------------------

    async def _feed(self, inst: Instance) -> None:
        """Subscribe to the instance's KV events; resync from a snapshot on any gap."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(f"tcp://{urlsplit(inst.url).hostname}:{inst.kv_events_port}")
        kv = self.state.kv
        try:
            await asyncio.sleep(SUBSCRIBE_SETTLE_S)
            await self._resync(inst)
            while True:
                data = await sock.recv()
                try:
                    batch = self._decoder.decode(data)
                except msgspec.DecodeError:
                    log.warning("bad KV event batch from %s: ignored", inst.url)
                    continue
                if kv.apply(inst.number, batch) or kv.needs_snapshot(inst.number):
                    await self._resync(inst)
        finally:
            sock.close(linger=0)

    async def _resync(self, inst: Instance) -> None:
        """Fetch snapshots until one lands cleanly (retrying while the instance is away)."""
        while True:
            try:
                status, body = await self.get(inst.url + "/kv/snapshot", SNAPSHOT_TIMEOUT)
                if status != 200:
                    raise ValueError(f"HTTP {status}")
                snap = msgspec.msgpack.decode(body, type=KVSnapshot)
                if not self.state.kv.reset(inst.number, snap):
                    return
            except (*UPSTREAM_ERRORS, ValueError, msgspec.DecodeError) as exc:
                log.debug("KV snapshot from %s failed: %s", inst.url, exc)
                await asyncio.sleep(self.poll_interval_s)


def forget_after_s(discover_interval_s: float) -> float:
    """How long a discovered member stays listed once it is out of rotation and unlisted."""
    return max(60.0, 12 * discover_interval_s)


def forgettable(instances: list[Instance], listed: set[str], now: float,
                after_s: float) -> list[Instance]:
    """The discovered instances out of rotation for `after_s` that no healthy instance
    lists (`listed`, the URLs in the latest /mesh answers)."""
    return [i for i in instances if i.discovered and not i.is_healthy
            and i.url not in listed and now - i.last_change_s >= after_s]


def mesh_urls(view: Any) -> list[str]:
    """The HTTP URLs in a `/mesh` answer: the node itself and its alive members."""
    if not isinstance(view, dict):
        raise ValueError("/mesh did not answer a JSON object")
    members = view.get("members")
    entries = [view.get("me"), *(m for m in (members if isinstance(members, list) else [])
                                 if isinstance(m, dict) and m.get("state") == "alive")]
    urls = [e.get("http_url") for e in entries if isinstance(e, dict)]
    return [u.rstrip("/") for u in urls if isinstance(u, str)
            and u.startswith(("http://", "https://")) and urlsplit(u).hostname]
