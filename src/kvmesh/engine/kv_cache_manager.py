"""Per-request block tables over the block pool, and prefix-cache lookups. Pure Python.

Owned by the scheduler. A request's table lists its blocks in token order; its first
`num_registered` blocks are full and published in the prefix index.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.engine.block_pool import BlockPool
from kvmesh.engine.request import Request
from kvmesh.hashing import BlockKey
from kvmesh.kvstore.tier import ExternalCache


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_reusable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading full blocks of a sequence may come from a cache.

    The one rule: the last token is never served from cache, since its logits are needed.
    """
    return (num_tokens - 1) // block_size


@dataclass(frozen=True)
class PrefixPlan:
    """Where a request's cached prefix comes from: device blocks, then host-tier keys."""

    device_blocks: list[int]
    external_keys: list[BlockKey]

    @property
    def num_blocks(self) -> int:
        return len(self.device_blocks) + len(self.external_keys)


NO_PREFIX = PrefixPlan([], [])


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool = True,
                 external: ExternalCache | None = None):
        self.pool = pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.external = external if enable_prefix_caching else None
        self._tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}
        self._loads: list[tuple[int, BlockKey]] = []
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Device blocks holding the longest cached prefix of `req` (never its last token)."""
        if not self.enable_prefix_caching:
            return []
        keys = req.update_block_keys(self.block_size)
        hits: list[int] = []
        for key in keys[: num_reusable_blocks(req.num_tokens, self.block_size)]:
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def lookup(self, req: Request, on_arrival: bool = False) -> PrefixPlan | None:
        """The one prefix lookup: device hits, then the blocks the tiers below hold ready.

        Starts fetches for blocks only a slower tier holds. None while the next block is
        still being fetched (the request should wait its turn rather than recompute it).
        `on_arrival` (the request was just queued) also holds its host-resident head in
        host memory while the tail is fetched; at admission, `allocate` pins what it takes.
        """
        device = self.find_cached_prefix(req)
        if self.external is None:
            return PrefixPlan(device, [])
        limit = num_reusable_blocks(req.num_tokens, self.block_size)
        rest = req.block_keys[len(device) : limit]
        match = self.external.lookup(rest, hold_head=on_arrival)
        if match.next_in_flight or (match.num_started and match.num_ready == 0):
            return None
        return PrefixPlan(device, list(rest[: match.num_ready]))

    def record_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_prompt_tokens
        self.num_hit_tokens += num_hit_tokens

    def allocate(self, req: Request, num_new_tokens: int, plan: PrefixPlan = NO_PREFIX) -> bool:
        """Make room for `num_new_tokens` more tokens of `req`, first taking the plan's
        device blocks, then fresh blocks for its host-tier keys (pinned, and queued as
        loads for the step: `take_loads`).

        All or nothing: returns False, changing nothing, when the pool is too small.
        """
        cached, external = plan.device_blocks, plan.external_keys
        num_loaded_blocks = len(external)
        table = self._tables.get(req.request_id, [])
        num_tokens = (req.num_computed_tokens + (len(cached) + num_loaded_blocks)
                      * self.block_size + num_new_tokens)
        num_needed = cdiv(num_tokens, self.block_size) - len(table) - len(cached)
        num_revived = sum(1 for b in cached if self.pool.ref_counts[b] == 0)
        if num_needed + num_revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(cached)
        table = self._tables.setdefault(req.request_id, table)
        table.extend(cached)
        self._num_registered.setdefault(req.request_id, 0)
        if cached:
            self._num_registered[req.request_id] = len(table)
        first_new = len(table)  # the loaded blocks are the first fresh ones
        if num_needed > 0:
            table.extend(self.pool.allocate(num_needed))
        if external:
            self._loads.extend(zip(table[first_new : first_new + num_loaded_blocks], external,
                                   strict=True))
            if self.external is not None:
                self.external.pin(external)
        return True

    def num_blocks_to_grow(self, reqs: list[Request], num_new_tokens: int) -> int:
        """Fresh blocks the requests need for `num_new_tokens` more computed tokens each."""
        bs = self.block_size
        return sum(max(0, cdiv(r.num_computed_tokens + num_new_tokens, bs)
                       - len(self._tables.get(r.request_id, ()))) for r in reqs)

    def take_loads(self) -> list[tuple[int, BlockKey]]:
        """(device block, host key) copies queued by `allocate` since the last call."""
        loads, self._loads = self._loads, []
        return loads

    def cache_blocks(self, req: Request) -> None:
        """Publish the request's newly full, computed blocks in the prefix index."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(req.request_id)
        if table is None:
            return
        done = self._num_registered[req.request_id]
        num_full = min(req.num_computed_tokens // self.block_size, len(table))
        if num_full <= done:
            return
        keys = req.update_block_keys(self.block_size)
        for index in range(done, num_full):
            self.pool.cache(table[index], keys[index])
        self._num_registered[req.request_id] = num_full

    def free(self, req: Request) -> None:
        """Release the request's blocks, tail first, so its shared head stays cached longest."""
        table = self._tables.pop(req.request_id, None)
        self._num_registered.pop(req.request_id, None)
        if table:
            self.pool.free(reversed(table))

    def reset_prefix_cache(self) -> int:
        return self.pool.evict_all()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        for table in self._tables.values():
            for block_id in table:
                refs[block_id] += 1
        assert refs == self.pool.ref_counts, "block tables disagree with ref counts"
        for rid, table in self._tables.items():
            assert self._num_registered[rid] <= len(table)
