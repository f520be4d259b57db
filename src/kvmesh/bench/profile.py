"""`kvmesh profile`: measure the real engine on this machine and fit the simulator's cost
model (`kvmesh.sim.cost_model.LinearCostModel`).

1. Step times: batches of S sequences with L-token prompts (S and L on a grid, random
   tokens so nothing is a cache hit) go through `LLMEngine.step`, the whole engine step
   (scheduling, model, sampling, detokenizing) timed on the wall clock, and the batch's
   `StepFeatures` recorded by a wrapper around the executor. A warm-up pass is dropped.
2. Block copies: the real host tier's copy in (store) and out (load) per block.
3. Disk reads: the real disk tier, a batch of blocks read through its worker pool.
4. Request overhead: tokenizing and templating a chat prompt, as the server does.

The fit is least squares with non-negative coefficients; its error is in the JSON.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmesh.config import EngineConfig, TierConfig
from kvmesh.engine.batch import ExecuteBatch, ExecuteResult, Executor
from kvmesh.engine.engine import LLMEngine
from kvmesh.hashing import BlockKey
from kvmesh.sim.cost_model import LinearCostModel, StepFeatures, TierCosts, step_features
from kvmesh.sim.fit import fit_step_model
from kvmesh.sim.shapes import ModelShape
from kvmesh.types import SamplingParams

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
PROMPT_LENS = (16, 128, 512, 1536)
OUTPUT_TOKENS = 12


@dataclass
class _Recorder:
    """Wraps the engine's executor; notes each batch's features."""

    inner: Executor
    block_size: int
    last: StepFeatures | None = None

    def execute(self, batch: ExecuteBatch) -> ExecuteResult:
        self.last = step_features(batch, self.block_size) if batch.seqs else None
        return self.inner.execute(batch)


def _run_grid(engine: LLMEngine, rec: _Recorder, sizes: Sequence[int], lens: Sequence[int],
              rng: random.Random, budget_s: float,
              on_step: Callable[[], None]) -> list[tuple[StepFeatures, float]]:
    samples: list[tuple[StepFeatures, float]] = []
    vocab = engine.inputs.vocab_size
    deadline = time.perf_counter() + budget_s
    for num_seqs in sizes:
        for prompt_len in lens:
            if num_seqs * (prompt_len + OUTPUT_TOKENS) > engine.pool.num_blocks * (
                    engine.config.cache.block_size) or time.perf_counter() > deadline:
                continue
            params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
            for _ in range(num_seqs):
                ids = [rng.randrange(100, vocab) for _ in range(prompt_len)]
                engine.add_tokens(None, ids, params)
            while engine.has_unfinished_requests():
                start = time.perf_counter()
                engine.step()
                elapsed = time.perf_counter() - start
                if rec.last is not None:
                    samples.append((rec.last, elapsed))
                on_step()
    return samples


def _copy_costs(engine: LLMEngine, num_blocks: int = 64) -> tuple[float, float]:
    """Seconds per block: device -> host (store) and host -> device (load)."""
    from kvmesh.kvstore.host import HostTier

    runner = engine.runner
    host = HostTier(num_blocks * runner.block_bytes, runner.block_bytes)
    n = min(num_blocks, engine.pool.num_blocks)
    keys = [BlockKey(random.randbytes(16)) for _ in range(n)]
    start = time.perf_counter()
    for i, key in enumerate(keys):
        host.put(key, runner.block(i))
    store_s = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for i, key in enumerate(keys):
        host.copy_out(key, runner.block(i))
    load_s = (time.perf_counter() - start) / n
    return store_s, load_s


def _disk_read_s(block_bytes: int, io_threads: int, num_blocks: int = 64) -> float:
    """Seconds one disk worker spends per block read (a batch through the pool)."""
    from kvmesh.kvstore.disk import DiskTier

    with tempfile.TemporaryDirectory(prefix="kvmesh-profile-") as tmp:
        disk = DiskTier(Path(tmp), (num_blocks + 1) * (block_bytes + 4096), block_bytes,
                        io_threads=io_threads)
        keys = [BlockKey(random.randbytes(16)) for _ in range(num_blocks)]
        for key in keys:
            disk.write(key, random.randbytes(block_bytes))
        disk.drain()
        disk.poll()
        start = time.perf_counter()
        futures = [disk.read(key) for key in keys if key in disk]
        for fut in futures:
            fut.result()
        elapsed = time.perf_counter() - start
        disk.close()
    return elapsed * io_threads / max(1, len(futures))


def _request_overhead_s(engine: LLMEngine, rng: random.Random, n: int = 20) -> float:
    from kvmesh.bench.datasets import words

    start = time.perf_counter()
    for _ in range(n):
        msgs = [{"role": "user", "content": words(rng, 200)}]
        engine.inputs.validate(engine.inputs.chat_ids(msgs, add_generation_prompt=True))
    return (time.perf_counter() - start) / n


def model_shape(engine: LLMEngine) -> ModelShape:
    a = engine.loaded.model.arch
    return ModelShape(engine.loaded.name, a.num_layers, a.hidden_size, a.intermediate_size,
                      a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size,
                      engine.max_model_len, a.tie_word_embeddings)


def profile_engine(config: EngineConfig, budget_s: float = 240.0, seed: int = 0,
                   on_step: Callable[[], None] = lambda: None) -> LinearCostModel:
    engine = LLMEngine(config, progress=False)
    rec = _Recorder(engine.executor, config.cache.block_size)
    engine.executor = rec  # type: ignore[assignment]
    rng = random.Random(seed)
    _run_grid(engine, rec, (1, 8), (64,), rng, budget_s, on_step)  # warm-up, dropped
    t0 = time.perf_counter()
    samples = _run_grid(engine, rec, BATCH_SIZES, PROMPT_LENS, rng, budget_s, on_step)
    store_s, load_s = _copy_costs(engine)
    tiers = config.tiers if config.tiers.is_enabled else TierConfig()
    coef, error = fit_step_model(samples, {"num_loads": load_s, "num_stores": store_s})
    costs = TierCosts(disk_read_s=_disk_read_s(engine.runner.block_bytes, tiers.io_threads),
                      disk_io_threads=tiers.io_threads,
                      request_overhead_s=_request_overhead_s(engine, rng))
    fit: dict[str, Any] = {**error, "profile_s": time.perf_counter() - t0,
                           "block_size": config.cache.block_size,
                           "num_blocks": engine.pool.num_blocks,
                           "dtype": str(engine.loaded.dtype).removeprefix("torch."),
                           "quantization": engine.loaded.quantization}
    return LinearCostModel(model_shape(engine), coef, engine.runner.kv.element_size(), costs,
                           fit)
