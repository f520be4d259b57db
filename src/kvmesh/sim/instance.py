"""One simulated instance: the engine's own `EngineCore`, block pool, scheduler, KV cache
manager and tier indexes (`VirtualHostTier` over a bounded `VirtualSource` disk), run by a
cost-model executor on the instance's virtual clock. No copy of engine logic lives here."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmesh.config import CacheConfig, SchedulerConfig, TierConfig
from kvmesh.engine.batch import BlockCopy, ExecuteBatch, ExecuteResult, SeqWork
from kvmesh.engine.core import EngineCore, ModelIdentity
from kvmesh.kvstore.store import TieredStore
from kvmesh.kvstore.virtual import VirtualHostTier, VirtualSource
from kvmesh.router.policies import InstanceLoad
from kvmesh.sim.clock import VirtualClock
from kvmesh.sim.cost_model import CostModel, RooflineCostModel, StepFeatures, step_features
from kvmesh.sim.workload import SimWorkload

# What a simulated model "generates" (cyclically). For chat workloads the simulator passes
# the tokens of ordinary text, so a reply sent back in the next turn tokenizes the same.
FILLER_TOKENS = SimWorkload.filler


@dataclass(frozen=True)
class InstanceSpec:
    """What one instance runs with: the engine's own config sections."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tiers: TierConfig = field(default_factory=TierConfig)

    @property
    def has_disk(self) -> bool:
        """As in `serve`: a disk tier of `tiers.disk_bytes` when `tiers.disk_path` is set
        (the simulator writes nothing there)."""
        return self.tiers.disk_path is not None


class CostModelExecutor:
    """The simulator's `Executor`: moves blocks in the tier indexes, advances the clock by
    the cost model's step time, and "samples" a fixed token sequence (never EOS)."""

    def __init__(self, clock: VirtualClock, cost: CostModel, store: TieredStore | None,
                 block_size: int, filler: tuple[int, ...] = FILLER_TOKENS):
        self.clock = clock
        self.cost = cost
        self.store = store
        self.block_size = block_size
        self.filler = filler
        self.busy_s = 0.0
        self.num_batches = 0
        self.run_ends: list[float] = []  # when each step of the last run ended

    def execute(self, batch: ExecuteBatch) -> ExecuteResult:
        if self.store is not None and (batch.stores or batch.loads):
            self.store.move(batch.stores, batch.loads, _no_bytes)
        self._spend(self.cost.step_s(step_features(batch, self.block_size)))
        self.num_batches += 1
        return ExecuteResult({s.request_id: self._token(s, 0) for s in batch.seqs
                              if s.is_sampling})

    def _spend(self, seconds: float) -> None:
        self.clock.sleep(seconds)
        self.busy_s += seconds

    def _token(self, seq: SeqWork, j: int) -> int:
        """The token `seq` samples `j` steps from now: the filler, cyclically."""
        num_out = len(seq.all_token_ids) - len(seq.prompt_token_ids)
        return self.filler[(num_out + j) % len(self.filler)]

    # decode runs (`EngineCore.step_decode_run`) ------------------------------------------

    def _run_costs(self, batch: ExecuteBatch, max_steps: int, stores: list[int],
                   until_s: float = float("inf")) -> list[float]:
        """Each step's cost: the features `execute` would see, context growing, step j
        saving `stores[j]` blocks; the steps that start before `until_s` (one at least)."""
        first = step_features(batch, self.block_size)
        costs = self.cost.decode_run_s(
            StepFeatures(first.num_seqs, first.num_tokens, first.num_sampling,
                         first.decode_ctx_tokens, block_size=self.block_size,
                         decode_shared_tokens=first.decode_shared_tokens),
            max_steps, stores)
        t = self.clock.now()
        for j, seconds in enumerate(costs):
            if t >= until_s and j:
                return costs[:j]
            t += seconds
        return costs

    def plan_run(self, batch: ExecuteBatch, max_steps: int, growth: list[int],
                 until_s: float) -> int:
        # Each new block evicts at most one: the planned steps cost no less than the
        # real ones, so every step run starts before `until_s`.
        return len(self._run_costs(batch, max_steps, growth, until_s))

    def sample_run(self, batch: ExecuteBatch, num_steps: int) -> dict[str, list[int]]:
        return {seq.request_id: [self._token(seq, j) for j in range(num_steps)]
                for seq in batch.seqs}

    def execute_run(self, batch: ExecuteBatch, num_steps: int,
                    stores: dict[int, tuple[BlockCopy, ...]]) -> None:
        per_step = {0: batch.stores, **stores}
        counts = [len(per_step.get(j, ())) for j in range(num_steps)]
        self.run_ends = []
        for j, seconds in enumerate(self._run_costs(batch, num_steps, counts)):
            if self.store is not None and per_step.get(j):
                self.store.move(per_step[j], (), _no_bytes)
            self._spend(seconds)
            self.run_ends.append(self.clock.now())
        self.num_batches += num_steps


def _no_bytes(block_id: int) -> None:
    return None


def block_bytes(cost: CostModel, block_size: int) -> int:
    return cost.shape.kv_bytes_per_token(cost.kv_dtype_bytes) * block_size


def num_device_blocks(cost: CostModel, cache: CacheConfig) -> int:
    """`cache.num_blocks`, else the byte budget: the GPU's memory after weights for a
    roofline model, `kv_cache_memory_bytes` for a profiled one."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = (cost.kv_capacity_bytes() if isinstance(cost, RooflineCostModel)
              else cache.kv_cache_memory_bytes)
    return max(1, budget // block_bytes(cost, cache.block_size))


class SimInstance:
    def __init__(self, index: int, spec: InstanceSpec, cost: CostModel,
                 filler: tuple[int, ...] = FILLER_TOKENS):
        if spec.scheduler.speculative_method:
            raise ValueError("the simulator does not model speculative decoding yet: leave "
                             "speculative_method unset")
        self.index = index
        self.clock = VirtualClock()
        self.block_size = spec.cache.block_size
        self.block_bytes = block_bytes(cost, self.block_size)
        self.num_blocks = num_device_blocks(cost, spec.cache)
        self.store = self._build_store(spec, cost)
        self.max_model_len = min(cost.shape.max_model_len, self.num_blocks * self.block_size)
        identity = ModelIdentity(f"sim:{cost.shape.name}", f"bytes{cost.kv_dtype_bytes}",
                                 self.max_model_len)
        self.core = EngineCore(spec.scheduler, spec.cache, identity, self.num_blocks,
                               self.store, spec.tiers.write_through, clock=self.clock)
        self.executor = CostModelExecutor(self.clock, cost, self.store, self.block_size, filler)
        self.is_stepping = False  # a step event is queued for this instance
        self.next_step_s = 0.0  # when (while is_stepping)

    def _build_store(self, spec: InstanceSpec, cost: CostModel) -> TieredStore | None:
        tiers = spec.tiers
        if not tiers.is_enabled or not spec.cache.enable_prefix_caching:
            return None
        # The tiers publish no events: nothing in the simulator listens to them yet (the
        # device pool's events still reach the core, which turns evictions into stores).
        host = VirtualHostTier(tiers.host_bytes // self.block_bytes, self.block_bytes,
                               tiers.host_policy)
        sources = []
        if spec.has_disk:
            sources.append(VirtualSource(
                "disk", (), self.clock.now, cost.tiers.disk_read_s, writable=True,
                num_slots=tiers.disk_bytes // self.block_bytes, policy=tiers.disk_policy,
                num_workers=cost.tiers.disk_io_threads,
                block_bytes=self.block_bytes))
        return TieredStore(tiers, host, sources, self.block_size, self.clock.now)

    def load(self, with_queue: bool = True) -> InstanceLoad:
        """The instance's load; `with_queue`: its queued prefill too (a pass over its
        requests, which only the cache-aware policies read)."""
        core = self.core
        queued = core.scheduler.num_prefill_tokens if with_queue else 0
        return InstanceLoad(core.num_running, core.num_waiting, core.pool.usage, self.index,
                            num_prefill_tokens=queued)
