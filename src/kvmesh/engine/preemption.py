"""What preempting a request would cost to undo. Pure Python."""

from __future__ import annotations

from kvmesh.engine.kv_cache_manager import KVCacheManager
from kvmesh.engine.request import Request

LOAD_COST_RATIO = 0.1  # loading a block from the host tier, against recomputing it


def restore_cost_tokens(req: Request, kv: KVCacheManager) -> float:
    """In prefill tokens: the partial last block is recomputed; the full blocks stay in the
    prefix index and, when a host tier exists, are offloaded there as they are evicted and
    loaded back (`LOAD_COST_RATIO` of a recompute); without one they are recomputed."""
    computed = req.num_computed_tokens
    if not kv.enable_prefix_caching:
        return float(computed)
    partial = computed % kv.block_size
    ratio = LOAD_COST_RATIO if kv.external is not None else 1.0
    return partial + (computed - partial) * ratio
