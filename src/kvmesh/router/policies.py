"""Routing policies, in a registry. Pure: no sockets, no asyncio, no clock.

A policy sees one request and the load of each candidate instance (the healthy ones), and
returns the position of its choice in that list. The simulator runs these; the proxy runs
the same objects.

The cache-aware policies (`prefix`, `kv`, and `session` when it falls back) minimise one
cost, in prefill-token equivalents:

    cost_i = (prompt_tokens - hit_tokens_i) + queue_weight * queued_i
             + load_cost_tokens * load_i

- `hit_tokens_i`: the prompt tokens instance i already holds (exactly, from its KV events,
  for `kv`; estimated from the router's own record of routed prompts for `prefix`);
- `queued_i`: the prefill tokens queued there, which this request's first token waits
  behind: the instance's last report (`/load`; none from an engine that does not report
  it), plus the predicted misses of the requests the router sent it after asking for that
  report and has not had a first byte back from;
- `load_i = in_flight_i + others_i`: the router's own count of requests in flight there,
  plus what the instance last reported beyond those (other clients' requests);
- `queue_weight` and `load_cost_tokens` (`RouteWeights`): the price of a queued prefill
  token, and of one more request in flight (mostly decoding: it slows each step, and
  stands for work the queue does not show yet), in prefill tokens. A large
  `load_cost_tokens` approaches `least_load`, a large `queue_weight` the least queued
  prefill; both at 0 always follow the cache. Unset, `load_cost_tokens` is 256 for
  `kv`, whose hits are exact, and 512 for `prefix`, whose hits are a guess that misses
  evictions and so needs the load to pull harder (`benchmarks/router_sim.py`).

The first two terms are the prefill done before this request's first token, so with the
weight at 1 the cost reads as a predicted TTFT in prefill-token units.

Ties go to the lower load, then the lower position.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvmesh.router.index import CHUNK_CHARS, KVIndex, PrefixIndex


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """An instance's load as a policy sees it. `num_running` and `num_waiting` are what the
    instance reported beyond `num_in_flight` (the router's own, always current count):
    a proxy subtracts its own in-flight requests from each report, so a stale report
    never counts a finished request."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of device KV blocks in use
    instance: int = 0  # the instance's stable number (what the indexes are keyed by)
    num_in_flight: int = 0  # requests the router has sent there and not seen finish
    num_prefill_tokens: int = 0  # prefill tokens queued there (reported + sent since asked)

    @property
    def load(self) -> int:
        return self.num_in_flight + self.num_running + self.num_waiting


@dataclass(frozen=True, slots=True)
class RouteRequest:
    session_id: str | None
    prompt_ids: Sequence[int] = ()
    num_prompt_tokens: int = 0  # known or estimated
    block_keys: Sequence[bytes] = ()  # the prompt's block keys (the `kv` policy)
    text_hashes: Sequence[int] = ()  # chunk hashes of its text (the `prefix` policy)
    block_size: int = 16


@dataclass(frozen=True)
class RouteWeights:
    """The named settings of the cache-aware cost (see the module docstring)."""

    load_cost_tokens: float | None = None  # None: EXACT_LOAD_COST or GUESSED_LOAD_COST
    queue_weight: float = 1.0  # per queued prefill token
    chars_per_token: float = 4.0  # `prefix`: matched characters -> tokens
    session_max_imbalance: int = 4  # `session`: move when home load exceeds the least by this

    def __post_init__(self) -> None:
        if (self.load_cost_tokens or 0) < 0 or self.queue_weight < 0 or self.chars_per_token <= 0:
            raise ValueError("load_cost_tokens and queue_weight must be >= 0 and "
                             "chars_per_token > 0")
        if self.session_max_imbalance < 0:
            raise ValueError("session_max_imbalance must be >= 0")


    def load_cost(self, exact_hits: bool) -> float:
        """The price of a request in flight: as set, else by how exact the hits are."""
        if self.load_cost_tokens is not None:
            return self.load_cost_tokens
        return EXACT_LOAD_COST if exact_hits else GUESSED_LOAD_COST


EXACT_LOAD_COST = 256.0  # `kv`: hits from the instances' own events
GUESSED_LOAD_COST = 512.0  # `prefix`: hits from what the router sent, evictions unseen


class RoutePolicy(Protocol):
    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int:
        i = self._next % len(loads)
        self._next = i + 1
        return i


class LeastLoad:
    """The instance with the fewest queued, running and in-flight requests; KV usage
    breaks ties, then the lowest position."""

    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int:
        return min(range(len(loads)), key=lambda i: (loads[i].load, loads[i].kv_usage, i))


def cheapest(prompt_tokens: float, hits: Sequence[float], loads: Sequence[InstanceLoad],
             weights: RouteWeights, exact_hits: bool = True) -> int:
    """The position minimising the documented cost."""
    per_request = weights.load_cost(exact_hits)

    def cost(i: int) -> tuple[float, int, int]:
        load = loads[i]
        miss = max(0.0, prompt_tokens - hits[i])
        return (miss + weights.queue_weight * load.num_prefill_tokens
                + per_request * load.load, load.load, i)

    return min(range(len(loads)), key=cost)


class KVAware:
    """Exact: hit tokens from the instances' KV events."""

    def __init__(self, index: KVIndex, weights: RouteWeights):
        self.index = index
        self.weights = weights

    def hit_tokens(self, request: RouteRequest, load: InstanceLoad) -> int:
        return self.index.match(load.instance, request.block_keys) * request.block_size

    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int:
        hits = [self.hit_tokens(request, load) for load in loads]
        return cheapest(request.num_prompt_tokens, hits, loads, self.weights)


class PrefixAware:
    """Approximate: the router's own record of which prompts it sent where. Records the
    chosen instance (the routed prompt is there now, or will be)."""

    def __init__(self, index: PrefixIndex, weights: RouteWeights):
        self.index = index
        self.weights = weights
        self.last_hit_tokens = 0.0  # the guessed hit of the last choice (the proxy reads it)

    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int:
        w = self.weights
        hits = [self.index.match(load.instance, request.text_hashes) * CHUNK_CHARS
                / w.chars_per_token for load in loads]
        best = cheapest(request.num_prompt_tokens, hits, loads, w, exact_hits=False)
        self.index.insert(loads[best].instance, request.text_hashes)
        self.last_hit_tokens = min(hits[best], float(request.num_prompt_tokens))
        return best


class Sticky:
    """Every request of a session goes to one home instance. A request without a session,
    a first request, and a request whose home is gone or carries more than
    `session_max_imbalance` requests above the least-loaded instance are placed by the
    fallback, which becomes the new home: `kv` once any instance publishes KV events
    (decided per request: instances may start publishing later), else least load."""

    MAX_SESSIONS = 1_000_000  # homes remembered, least recently used forgotten first

    def __init__(self, state: RouterState | None = None):
        self._state = state or RouterState()
        self._home: OrderedDict[str, int] = OrderedDict()  # session -> instance number
        self._kv = KVAware(self._state.kv, self._state.weights)
        self._least = LeastLoad()
        self.max_imbalance = self._state.weights.session_max_imbalance

    def choose(self, request: RouteRequest, loads: Sequence[InstanceLoad]) -> int:
        sid = request.session_id
        home = self._home.get(sid) if sid is not None else None
        pos = next((j for j, load in enumerate(loads) if load.instance == home), None)
        least = min(load.load for load in loads)
        if pos is None or loads[pos].load > least + self.max_imbalance:
            fallback = self._kv if self._state.has_kv_events else self._least
            pos = fallback.choose(request, loads)
        if sid is not None:
            self._home[sid] = loads[pos].instance
            self._home.move_to_end(sid)
            if len(self._home) > self.MAX_SESSIONS:
                self._home.popitem(last=False)
        return pos


@dataclass
class RouterState:
    """The indexes the cache-aware policies read (the proxy feeds `kv`)."""

    weights: RouteWeights = field(default_factory=RouteWeights)
    kv: KVIndex = field(default_factory=KVIndex)
    prefix: PrefixIndex = field(default_factory=PrefixIndex)
    has_kv_events: bool = False


ROUTE_POLICIES: dict[str, Callable[[RouterState], RoutePolicy]] = {
    "round_robin": lambda s: RoundRobin(),
    "least_load": lambda s: LeastLoad(),
    "prefix": lambda s: PrefixAware(s.prefix, s.weights),
    "kv": lambda s: KVAware(s.kv, s.weights),
    "session": Sticky,
}


def make_route_policy(name: str, state: RouterState | None = None) -> RoutePolicy:
    try:
        factory = ROUTE_POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose from {', '.join(ROUTE_POLICIES)}"
        ) from None
    return factory(state or RouterState())
