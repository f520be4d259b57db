"""The pure engine core: importable and drivable with torch, numpy, asyncio, socket and
threading blocked; block events that mirror the pool and the host index exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import xxhash

from tests.engine import core_driver

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "numpy", "asyncio", "socket", "threading", "concurrent")
PURE_MODULES = (
    "kvmesh.engine.core", "kvmesh.engine.scheduler", "kvmesh.engine.kv_cache_manager",
    "kvmesh.engine.block_pool", "kvmesh.engine.events", "kvmesh.engine.policies",
    "kvmesh.engine.schedule", "kvmesh.engine.step_budget", "kvmesh.engine.admission",
    "kvmesh.kvstore.index", "kvmesh.kvstore.eviction", "kvmesh.kvstore.store",
    "kvmesh.kvstore.virtual",
)
SCRIPT = """
import json, sys
BLOCKED = {blocked!r}
early = sorted(m for m in BLOCKED if m in sys.modules)

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked in the pure core: " + name)
        return None

sys.meta_path.insert(0, Blocker())
sys.path[:0] = {paths!r}
import importlib
for name in {modules!r}:
    importlib.import_module(name)
from tests.engine import core_driver
result = core_driver.drive(num_requests=80, seed=3)
result["early"] = early
result["loaded"] = sorted(m for m in BLOCKED if m in sys.modules)
print(json.dumps(result))
"""


def test_core_is_pure_and_runs_hundreds_of_steps_with_integrity_checks():
    site = str(Path(xxhash.__file__).resolve().parents[1])
    script = SCRIPT.format(blocked=BLOCKED, paths=[str(ROOT / "src"), str(ROOT), site],
                           modules=PURE_MODULES)
    # -S: no site hooks, which import threading before any kvmesh code runs.
    r = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["early"] == [] and out["loaded"] == []
    assert out["steps"] >= 200 and not out["unfinished"]
    assert out["finished"] == out["sequences"]  # every sequence ended: stop, length, abort
    assert out["event_errors"] == [] and out["events"] > 1000
    # Every tier served something: the device cache, host memory and the (virtual) disk.
    assert out["device_hit_tokens"] > 0 and out["host_hits"] > 0 and out["disk_hits"] > 0
    assert out["loads"] > 0 and out["stores"] > 0 and out["preemptions"] > 0


def test_events_mirror_pool_and_host_in_process():
    """The driver checks, after every step, that replaying the events gives exactly the
    device pool's and the host index's keys; several seeds, several shapes of load."""
    for seed in range(4):
        out = core_driver.drive(num_requests=40 + 10 * seed, seed=seed)
        assert out["event_errors"] == [] and out["finished"] == out["sequences"]


def test_core_without_tiers_and_a_failing_executor():
    """No store: no stores or loads in any batch. An executor error fails the batch's
    sequences (and held n > 1 siblings) with an error update; the core stays usable."""
    from kvmesh.config import CacheConfig, SchedulerConfig
    from kvmesh.engine.core import EngineCore, ModelIdentity
    from kvmesh.types import SamplingParams

    clock = core_driver.FakeClock()
    core = EngineCore(SchedulerConfig(), CacheConfig(block_size=4),
                      ModelIdentity("m", "f32", 128), num_blocks=32, clock=clock)

    class Boom:
        def execute(self, batch):
            raise RuntimeError("device lost")

    ids = core.add("a", list(range(3, 20)), SamplingParams(n=3, max_tokens=4))
    updates = core.step(Boom())
    assert sorted(u.seq_id for u in updates) == sorted(ids)
    assert all(u.finish_reason == "error" and "device lost" in (u.error or "") for u in updates)
    assert isinstance(core.last_error, RuntimeError) and not core.has_unfinished()
    core.check_integrity()
    executor = core_driver.FakeExecutor(clock, None)
    core.add("b", list(range(3, 20)), SamplingParams(max_tokens=3, temperature=0))
    tokens = []
    while core.has_unfinished():
        tokens += [u.token_id for u in core.step(executor)]
        core.check_integrity()
    assert len(tokens) == 3 and executor.stores == executor.loads == 0


def test_a_finished_request_s_blocks_are_announced_without_another_step():
    """The blocks a step fills reach the outbox's subscribers (the mesh directory, the
    router's KV events) in that step, not at the next one: an idle engine has no next."""
    from kvmesh.types import SamplingParams

    core, executor, _, mirror = core_driver.build()
    prompt = list(range(3, 3 + 37))  # 9 full blocks of 4, and a partial one
    core.add("r", prompt, SamplingParams(temperature=0, max_tokens=1))
    while core.has_unfinished():
        core.step(executor)
    assert len(mirror.held.get("device", set())) >= len(prompt) // 4
    assert not mirror.errors

