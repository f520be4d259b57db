"""`kvmesh profile`: measure the real engine on this machine, serving, and fit the
simulator's cost model (`kvmesh.sim.cost_model.LinearCostModel`).

1. Step times, as served: the engine runs behind the real HTTP server (in this process),
   and `kvmesh bench` processes drive it on loopback with a grid of concurrency and
   prompt lengths. Each engine step's `StepFeatures` (a wrapper around the executor) and
   its period (from its start to the next step's start, while work remained) are
   recorded, so HTTP streaming, detokenizing and the client's share of the CPU are in the
   figures the simulator replays. A warm-up run is dropped.
2. Block copies: the real host tier's copy in (store) and out (load) per block.
3. Disk reads: the real disk tier, a batch of blocks read through its worker pool.
4. Request overhead: the client's TTFT for single requests minus the fitted time of
   their prefill step (HTTP, tokenizing, queueing a command on the engine thread).

The fit is least squares with non-negative coefficients; its error is in the JSON.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kvmesh.config import EngineConfig, ServerConfig, TierConfig
from kvmesh.engine.batch import ExecuteBatch, ExecuteResult, Executor
from kvmesh.hashing import BlockKey
from kvmesh.sim.cost_model import LinearCostModel, StepFeatures, TierCosts, step_features
from kvmesh.sim.fit import fit_step_model
from kvmesh.sim.shapes import ModelShape


class Row(NamedTuple):
    """One load run of the grid: `kvmesh bench` with these settings."""

    concurrency: int
    words: int  # prompt length (the shared prefix's, when `groups`)
    output: int
    requests: int
    groups: int = 0  # 0: random prompts; else shared-prefix prompts in this many groups


# Short and long prompts, 1 to 48 streams; two shared-prefix runs put many sequences on a
# few cached prefixes (decode context beyond the device cache's distinct capacity), which
# tells the fit `decode_ctx_tokens` from `decode_kv_tokens`. The first row also
# calibrates the request overhead.
GRID = (Row(1, 48, 24, 12), Row(1, 700, 8, 6), Row(2, 200, 32, 12), Row(4, 128, 48, 16),
        Row(8, 1200, 16, 16), Row(32, 500, 32, 64, groups=2), Row(8, 64, 32, 24),
        Row(16, 128, 48, 48), Row(24, 400, 24, 48), Row(32, 300, 32, 64),
        Row(48, 64, 48, 96), Row(48, 250, 48, 96, groups=4))
WARMUP = Row(4, 64, 8, 8)


@dataclass
class _Recorder:
    """Wraps the engine's executor and observes the step loop (engine thread)."""

    inner: Executor
    block_size: int
    last: StepFeatures | None = None
    samples: list[tuple[StepFeatures, float]] = field(default_factory=list)
    _pending: tuple[StepFeatures, float] | None = None
    is_recording: bool = False

    def execute(self, batch: ExecuteBatch) -> ExecuteResult:
        if batch.seqs:
            self.last = step_features(batch, self.block_size)
        return self.inner.execute(batch)

    def observe(self, start: float, end: float, busy: bool) -> None:
        """A step's period runs to the next step's start when work was left."""
        if self._pending is not None and self.is_recording:
            self.samples.append((self._pending[0], start - self._pending[1]))
        self._pending = (self.last, start) if busy and self.last is not None else None
        self.last = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(config: EngineConfig, port: int) -> tuple[Any, Any, threading.Thread]:
    """The real server app on a thread; returns (uvicorn server, app state, its thread)
    once ready."""
    import uvicorn

    from kvmesh.server.api import create_app

    app = create_app(config, ServerConfig(port=port, log_level="warning"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="kvmesh-profile-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2):
                return server, app.state.kvmesh, thread
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the profiled server did not become ready in 600 s")


def row_args(row: Row) -> list[str]:
    """`kvmesh bench` flags for one grid row."""
    dataset = ["--dataset", "shared-prefix", "--groups", str(row.groups)] if row.groups \
        else ["--dataset", "random"]
    return [*dataset, "--num-requests", str(row.requests), "--input-len", str(row.words),
            "--output-len", str(row.output), "--concurrency", str(row.concurrency)]


def bench_process(port: int, args: list[str], out: Path) -> dict[str, Any]:
    """A `kvmesh bench` client process (flags `args`) against the server on `port`: its
    run (`summary` and `records`)."""
    cmd = [sys.executable, "-m", "kvmesh.cli", "bench", "--base-url",
           f"http://127.0.0.1:{port}", *args, "--out", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
    return dict(json.loads(out.read_text())["runs"][0])


def run_bench(port: int, args: list[str], out: Path) -> list[dict]:
    """`bench_process`'s records."""
    return list(bench_process(port, args, out)["records"])


def _copy_costs(engine: Any, num_blocks: int = 64) -> tuple[float, float]:
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
    if runner.device.type == "cuda":  # copies from pinned slots are asynchronous
        import torch

        torch.cuda.synchronize(runner.device)
    return store_s, (time.perf_counter() - start) / n


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


def _request_overhead_s(records: list[dict], coef: dict[str, float], block_size: int,
                        budget: int, fused_rows: int) -> float:
    """Mean client TTFT of lone requests minus the modelled time of their prefill (the
    tokens after the cached prefix: the chat template's system prompt is shared)."""
    model = LinearCostModel(ModelShape("x", 1, 1, 1, 1, 1, 1, 1, 1), coef,
                            fused_rows=fused_rows)
    gaps = []
    for r in records:
        cached = r.get("cached_tokens") or 0
        n = (r["prompt_tokens"] or 0) - cached
        if not r["ok"] or n < 1 or n > budget:
            continue
        f = StepFeatures(1, n, 1, 0, n * (cached + (n + 1) / 2) / 1000, cached + n,
                         block_size=block_size, num_prefill_seqs=int(n > 1))
        gaps.append(r["ttft_s"] - model.step_s(f))
    return max(0.0, sum(gaps) / len(gaps)) if gaps else 0.0


def fused_decode_rows(engine: Any) -> int:
    """The most decode sequences a step of `engine` runs on its fused native path (0: it
    has none, every step runs op by op)."""
    runner = engine.runner
    fused = getattr(runner.model, "fused", None)
    return 0 if fused is None else int(fused.rows_with(runner.decode_kernel, runner.kv.dtype))


def model_shape(engine: Any) -> ModelShape:
    a = engine.loaded.model.arch
    return ModelShape(engine.loaded.name, a.num_layers, a.hidden_size, a.intermediate_size,
                      a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size,
                      engine.max_model_len, a.tie_word_embeddings)


@contextmanager
def recorded_server(config: EngineConfig) -> Iterator[tuple[int, _Recorder, Any]]:
    """The real server in this process with its steps recorded: (port, recorder, engine).
    Recording starts when `recorder.is_recording` is set."""
    server, state, thread = _serve(config, port := _free_port())
    engine = state.engine.engine  # the LLMEngine behind the AsyncEngine
    rec = _Recorder(engine.executor, config.cache.block_size)
    engine.executor = rec  # swapped while idle: the engine thread reads it per step
    state.engine.step_observer = rec.observe
    try:
        yield port, rec, engine
    finally:  # shut down (the engine and its tiers too) before the caller's files go
        server.should_exit = True
        thread.join(timeout=120)


def profile_engine(config: EngineConfig, budget_s: float = 600.0, seed: int = 0,
                   on_row: Callable[[], None] = lambda: None) -> LinearCostModel:
    t0 = time.perf_counter()
    lone: list[dict] = []
    with recorded_server(config) as (port, rec, engine), \
            tempfile.TemporaryDirectory(prefix="kvmesh-profile-") as tmp:
        run_bench(port, [*row_args(WARMUP), "--seed", str(seed)], Path(tmp) / "warmup.json")
        rec.is_recording = True
        for i, row in enumerate(GRID):
            if i and time.perf_counter() - t0 > budget_s:  # the first row always runs
                break
            records = run_bench(port, [*row_args(row), "--seed", str(seed + i + 1)],
                                Path(tmp) / f"row{i}.json")
            lone += records if row.concurrency == 1 and row.words < 200 else []
            on_row()
        rec.is_recording = False
        store_s, load_s = _copy_costs(engine)
    fused_rows = fused_decode_rows(engine)
    coef, error = fit_step_model(rec.samples, {"num_loads": load_s, "num_stores": store_s},
                                 fused_rows)
    tiers = config.tiers if config.tiers.is_enabled else TierConfig()
    costs = TierCosts(disk_read_s=_disk_read_s(engine.runner.block_bytes, tiers.io_threads),
                      disk_io_threads=tiers.io_threads,
                      request_overhead_s=_request_overhead_s(
                          lone, coef, config.cache.block_size,
                          config.scheduler.max_num_batched_tokens, fused_rows))
    fit: dict[str, Any] = {**error, "profile_s": time.perf_counter() - t0,
                           "block_size": config.cache.block_size,
                           "num_blocks": engine.pool.num_blocks,
                           "dtype": str(engine.loaded.dtype).removeprefix("torch."),
                           "quantization": engine.loaded.quantization,
                           "grid": [list(r) for r in GRID],
                           # (features in FEATURES order, measured period): to refit
                           "samples": [[*f.vector(fused_rows), round(t, 6)]
                                       for f, t in rec.samples]}
    return LinearCostModel(model_shape(engine), coef, engine.runner.kv.element_size(), costs,
                           fit, fused_rows)
