"""The simulator runs the engine's own core on a virtual clock: identity of the classes it
runs, purity, determinism (a golden), tiers and routing, and the workloads it replays."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from kvmesh.config import CacheConfig, SchedulerConfig, TierConfig
from kvmesh.engine.block_pool import BlockPool
from kvmesh.engine.core import EngineCore
from kvmesh.engine.kv_cache_manager import KVCacheManager
from kvmesh.engine.scheduler import Scheduler
from kvmesh.kvstore.index import TierIndex
from kvmesh.kvstore.store import TieredStore
from kvmesh.kvstore.virtual import VirtualHostTier, VirtualSource
from kvmesh.router.policies import make_route_policy
from kvmesh.sim.cost_model import LinearCostModel, roofline
from kvmesh.sim.instance import InstanceSpec, SimInstance
from kvmesh.sim.run import SimConfig, simulate
from kvmesh.sim.simulator import Simulator
from kvmesh.sim.workload import BlockTokens, TokenSession, mooncake_sessions

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
GOLDEN = Path(__file__).with_name("golden.json")
COST = roofline("l4", "llama-3.1-8b")


def tiered_spec(num_blocks: int = 96, host_blocks: int = 64, disk: bool = True) -> InstanceSpec:
    block_bytes = COST.shape.kv_bytes_per_token(2) * 16
    return InstanceSpec(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256),
                        CacheConfig(num_blocks=num_blocks),
                        TierConfig(host_bytes=host_blocks * block_bytes,
                                   disk_path="sim" if disk else None, disk_bytes=1 << 40))


def shared_sessions(n: int = 60, seed: int = 0) -> list[TokenSession]:
    """Requests over 5 shared prefixes of 160-320 tokens, arriving 0.05 s apart."""
    import random

    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000, 9000) for _ in range(rng.randrange(160, 320))]
                for _ in range(5)]
    return [TokenSession(i * 0.05, [rng.randrange(4, 24)],
                         prompts=[rng.choice(prefixes) + [rng.randrange(1000, 9000)
                                                           for _ in range(rng.randrange(1, 40))]])
            for i in range(n)]


def run(spec: InstanceSpec, sessions, n: int = 1, route: str = "round_robin") -> dict:
    return simulate(spec, COST, SimConfig(num_instances=n, route=route), sessions,
                    [s.arrival_s for s in sessions])


def test_the_simulator_runs_the_engines_own_classes():
    inst = SimInstance(0, tiered_spec(), COST)
    assert type(inst.core) is EngineCore
    assert type(inst.core.scheduler) is Scheduler
    assert type(inst.core.kv) is KVCacheManager
    assert type(inst.core.pool) is BlockPool
    assert type(inst.store) is TieredStore
    assert type(inst.store.host) is VirtualHostTier
    disk = inst.store.sources[0]
    assert type(disk) is VirtualSource and type(disk.index) is TierIndex
    from kvmesh.kvstore.host import HostTier  # the engine's host tier is the same index

    assert issubclass(HostTier, VirtualHostTier)


def test_no_engine_logic_is_copied_under_sim():
    """No class of the engine's core is redefined in kvmesh.sim (they are imported)."""
    engine_names = {"Scheduler", "KVCacheManager", "BlockPool", "EngineCore", "TieredStore",
                    "TierIndex", "Request"}
    for path in (ROOT / "src" / "kvmesh" / "sim").glob("*.py"):
        text = path.read_text()
        for name in engine_names:
            assert f"class {name}" not in text, f"{path.name} defines {name}"
            assert "def schedule(" not in text and "def allocate(" not in text


def test_the_simulator_never_imports_torch():
    site = str(Path(xxhash.__file__).resolve().parents[1])
    script = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, B())\n"
        f"sys.path[:0] = {[str(ROOT / 'src'), str(ROOT), site]!r}\n"
        "from tests.sim.test_sim import run, shared_sessions, tiered_spec\n"
        "f = run(tiered_spec(), shared_sessions(20))\n"
        "print(f['completed'], 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["20", "False"]


def _digest(figures: dict) -> dict:
    records = [r.to_json() for r in figures.pop("records")]
    blob = json.dumps(records, sort_keys=True).encode()
    return {"records_sha256": hashlib.sha256(blob).hexdigest(),
            "completed": figures["completed"], "duration_s": round(figures["duration_s"], 9),
            "cached_tokens": figures["cached_tokens"],
            "tiers": {k: v["hit_tokens"] for k, v in figures["tiers"].items()
                      if isinstance(v, dict)}}


def test_same_seed_same_results_golden():
    """Two runs give identical records; they also match the stored golden, so a change in
    scheduling or caching behaviour shows up here (regenerate with KVMESH_UPDATE_GOLDEN=1
    when the change is intended)."""
    first = _digest(run(tiered_spec(), shared_sessions(80, seed=7), n=2))
    second = _digest(run(tiered_spec(), shared_sessions(80, seed=7), n=2))
    assert first == second
    assert first["completed"] == 80
    if os.environ.get("KVMESH_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(first, indent=2) + "\n")
    assert first == json.loads(GOLDEN.read_text())
    other = _digest(run(tiered_spec(), shared_sessions(80, seed=8), n=2))
    assert other["records_sha256"] != first["records_sha256"]


def test_tiers_serve_hits_when_the_device_cache_is_small():
    """A device cache smaller than the working set: evicted prefixes come back from host
    memory, and from the disk when host memory is small too."""
    sessions = shared_sessions(80)
    no_tiers = run(InstanceSpec(tiered_spec().scheduler, CacheConfig(num_blocks=48)), sessions)
    host = run(tiered_spec(num_blocks=48, host_blocks=200, disk=False), sessions)
    disk = run(tiered_spec(num_blocks=48, host_blocks=24, disk=True), sessions)
    assert host["tiers"]["host"]["hit_tokens"] > 0
    assert disk["tiers"]["disk"]["hit_tokens"] > 0 and disk["tiers"]["disk"]["bytes_out"] > 0
    assert host["cached_tokens"] > no_tiers["cached_tokens"]
    assert disk["cached_tokens"] > no_tiers["cached_tokens"]
    for figures in (no_tiers, host, disk):
        assert figures["completed"] == 80 and figures["failed"] == 0


def test_session_routing_keeps_multi_turn_history_on_one_instance():
    sessions = [TokenSession(0.01 * i, [8, 8, 8],
                             prompts=[list(range(1000 + 97 * i, 1400 + 97 * i + 40 * t))
                                      for t in range(3)]) for i in range(10)]
    sticky = run(tiered_spec(disk=False), sessions, n=3, route="session")
    spread = run(tiered_spec(disk=False), sessions, n=3, route="round_robin")
    assert sticky["completed"] == spread["completed"] == 30
    assert sticky["cached_tokens"] > spread["cached_tokens"]


def test_overload_is_refused_like_the_server():
    """A full waiting queue gives 429 records; a prompt over max_model_len a 400."""
    spec = InstanceSpec(SchedulerConfig(max_waiting=4, max_num_seqs=2), CacheConfig(num_blocks=64))
    long = TokenSession(0.0, [4], prompts=[list(range(2000, 2000 + 64 * 16 + 1))])
    burst = [TokenSession(0.0, [32], prompts=[list(range(3000 + i, 3100 + i))]) for i in range(12)]
    figures = run(spec, [long, *burst])
    statuses = sorted(r.status for r in figures["records"] if not r.ok)
    assert statuses.count(400) == 1 and statuses.count(429) >= 1
    assert figures["completed"] + figures["failed"] == 13


def test_virtual_disk_is_bounded_and_reads_queue_on_its_workers():
    t = [0.0]
    disk = VirtualSource("disk", (), lambda: t[0], latency_s=0.01, writable=True,
                         num_slots=3, num_workers=2, block_bytes=100)
    keys = [bytes([i]) * 16 for i in range(5)]
    for key in keys:
        disk.write(key, b"")  # type: ignore[arg-type]
    assert sum(k in disk for k in keys) == 3 and disk.stats.evictions == 2
    reads = [disk.read(k) for k in keys[2:]]  # type: ignore[arg-type]
    t[0] = 0.01
    assert [r.done() for r in reads] == [True, True, False]  # the third waits for a worker
    t[0] = 0.02
    assert reads[2].done() and disk.stats.bytes_out == 300
    disk.check_integrity()


def test_simulator_validates_its_fleet():
    with pytest.raises(ValueError, match="num_instances"):
        Simulator(tiered_spec(), COST, 0, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="route"):
        SimConfig(route="random")
    with pytest.raises(ValueError, match="SLO"):
        SimConfig(slo="ttft=3")


def test_mooncake_blocks_become_equal_tokens_for_equal_ids():
    blocks = BlockTokens(512)
    assert blocks(7) == blocks(7) and len(blocks(7)) == 512
    assert blocks(7)[:2] != blocks(8)[:2] and blocks(7, 100) == blocks(7)[:100]
    assert blocks(3 + 29000)[:2] != blocks(3)[:2]  # ids one "digit" apart differ too
    if not TRACE.is_file():
        pytest.skip("shared traces not present")
    sessions = mooncake_sessions(TRACE, limit=30)
    rows = [json.loads(line) for line in TRACE.open().readlines()[:30]]
    for s, row in zip(sessions, rows, strict=True):
        assert len(s.prompt(0, [])) == row["input_length"]
        assert s.max_tokens == [row["output_length"]]
    a, b = sessions[0].prompt(0, []), sessions[1].prompt(0, [])  # both start with id 0
    assert a[:512] == b[:512] and a[512:1024] != b[512:1024]


def test_mooncake_replay_hits_the_shared_prefixes():
    if not TRACE.is_file():
        pytest.skip("shared traces not present")
    sessions = mooncake_sessions(TRACE, limit=120, length_scale=0.125, max_output=16)
    spec = InstanceSpec(SchedulerConfig(max_num_batched_tokens=2048),
                        CacheConfig(num_blocks=4096),
                        TierConfig(host_bytes=1 << 34, disk_path="sim"))
    figures = simulate(spec, roofline("h100", "llama-3.1-8b"), SimConfig(num_instances=2),
                       sessions, [s.arrival_s for s in sessions])
    assert figures["completed"] == 120
    assert 0 < figures["cached_token_ratio"] < 1
    assert figures["tiers"]["queried_tokens"] == figures["prompt_tokens"]


def test_decode_runs_give_the_same_results_as_stepping_one_by_one():
    """The fast path (`EngineCore.step_decode_run`) changes how fast the simulator runs,
    not what it predicts: the same records, token times included, with and without it.
    Cases: tiers (evictions become stores mid-run), prompts one token longer than a
    step's budget (a first token inside a run), repeated identical prompts (their decode
    blocks collide in the prefix index), multi-turn sessions under a concurrency limit on
    three instances (a finished turn starts the next one)."""
    single = shared_sessions(80, seed=3)
    single += [TokenSession(0.3 * i, [20], prompts=[list(range(5000 + i, 5000 + i + n))])
               for i, n in enumerate((257, 513, 257, 513))]
    single += [TokenSession(1.0 + 0.5 * i, [40], prompts=[list(range(7000, 7100))])
               for i in range(6)]
    chat = [TokenSession(0.02 * i, [12, 12, 12],
                         prompts=[list(range(1000 + 97 * (i % 4), 1400 + 40 * t))
                                  for t in range(3)]) for i in range(18)]
    specs = (InstanceSpec(SchedulerConfig(max_num_seqs=16), CacheConfig(num_blocks=400)),
             tiered_spec(num_blocks=64, host_blocks=48))
    linear = LinearCostModel(COST.shape, {"const": 0.004, "num_tokens": 3e-4,
                                          "num_sampling": 1.7e-4, "decode_ctx_tokens": 3.3e-6,
                                          "num_stores": 7e-5, "num_prefill_seqs": 0.011,
                                          "decode_kv_tokens": 1.3e-6, "unfused_step": 0.02,
                                          "fused_seqs_1_2": 1.1e-3, "fused_seqs_2_4": 7e-4,
                                          "fused_seqs_4_8": 3e-4, "fused_seqs_8_16": 2e-4,
                                          "fused_seqs_16_32": 1e-4, "fused_seqs_32_up": 5e-5},
                             kv_dtype_bytes=2, fused_rows=8)  # 16 sequences cross it
    cases = [(single, 2, None, COST), (chat, 3, 6, COST), (chat, 3, 6, linear)]
    for sessions, n, concurrency, cost in cases:
        starts = [s.arrival_s for s in sessions]
        for spec in specs:
            runs = []
            for fast in (False, True):
                sim = Simulator(spec, cost, n, make_route_policy("least_load"),
                                decode_runs=fast)
                run = sim.run(sessions, starts, concurrency)
                runs.append(([r.to_json() for r in run.records],
                             [(i.core.num_steps, i.executor.num_batches, i.executor.busy_s,
                               i.core.pool.num_free_blocks, i.core.kv.num_hit_tokens)
                              for i in run.instances]))
            assert runs[1] == runs[0]
            assert all(r["ok"] for r in runs[0][0])


def test_the_router_policies_run_in_the_simulator():
    """The router's own kv and prefix policies, fed by the simulated instances' block
    events and routed prompts, keep 6 long shared prefixes apart on 3 instances that hold
    about 3 each, where round robin makes every instance thrash through all 6."""
    import random

    rng = random.Random(3)
    prefixes = [[rng.randrange(1000, 9000) for _ in range(800)] for _ in range(6)]
    sessions = [TokenSession(i * 0.2, [8], prompts=[rng.choice(prefixes) + [
        rng.randrange(1000, 9000) for _ in range(20)]]) for i in range(90)]
    spec = InstanceSpec(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256),
                        CacheConfig(num_blocks=160))
    hits = {route: run(spec, sessions, n=3, route=route)["cached_tokens"]
            for route in ("round_robin", "kv", "prefix")}
    assert hits["kv"] > 1.5 * hits["round_robin"], hits
    assert hits["prefix"] > 1.5 * hits["round_robin"], hits
