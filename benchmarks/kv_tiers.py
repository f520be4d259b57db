"""KV tiers on the default model: TTFT by cache source, tier bandwidth, Mooncake replay.

    python benchmarks/kv_tiers.py [--lengths 1024,2048,4096] [--trace-requests 300]

TTFT is prefill plus the first token, in-process, for prompts of each length: cold, then
hits from the device, host DRAM, disk (page cache dropped with posix_fadvise), and disk
after a process restart. Bandwidths are compared with a plain tensor copy and plain file
I/O of the same bytes in the same run. Writes benchmarks/results/kv_tiers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import memcpy_gbps, save  # noqa: E402

from kvmesh import LLM, SamplingParams  # noqa: E402

ONE = SamplingParams(temperature=0.0, max_tokens=1)


def drop_page_cache(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    out = llm.generate([prompt], ONE)[0]
    return time.perf_counter() - start, out.num_cached_tokens


def clear_host(llm: LLM) -> None:
    store = llm.engine.store
    store.persist()
    for key in store.host.list_keys():
        store.host.remove(key)


RESTART = """
import json, sys, time
from kvmesh import LLM, SamplingParams
llm = LLM(host_bytes=int(sys.argv[2]), disk_path=sys.argv[1], disk_bytes=20 * 2**30)
prompt = json.loads(sys.argv[3])
start = time.perf_counter()
out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))[0]
print("RESULT", time.perf_counter() - start, out.num_cached_tokens)
"""


def ttft_by_source(lengths: list[int], disk: Path, host_bytes: int) -> dict:
    llm = LLM(host_bytes=host_bytes, disk_path=str(disk), disk_bytes=20 * 2**30)
    rng = random.Random(0)
    llm.generate([[rng.randrange(100, 40000) for _ in range(64)]], ONE)  # warm-up
    out: dict = {src: {} for src in ("cold", "device", "host", "disk", "restart")}
    cached: dict = {src: {} for src in out}
    for n in lengths:
        prompt = [rng.randrange(100, 40000) for _ in range(n)]
        key = f"{n // 1024}k"
        out["cold"][key], cached["cold"][key] = ttft(llm, prompt)
        out["device"][key], cached["device"][key] = ttft(llm, prompt)
        llm.engine.kv.reset_prefix_cache()  # device blocks are offloaded to host DRAM
        out["host"][key], cached["host"][key] = ttft(llm, prompt)
        llm.engine.kv.reset_prefix_cache()
        llm.engine._flush_offloads()
        clear_host(llm)  # now only on disk
        drop_page_cache(disk)
        out["disk"][key], cached["disk"][key] = ttft(llm, prompt)
        llm.engine.kv.reset_prefix_cache()
        llm.engine._flush_offloads()
        llm.engine.store.persist()
        drop_page_cache(disk)
        r = subprocess.run([sys.executable, "-c", RESTART, str(disk), str(host_bytes),
                            json.dumps(prompt)], capture_output=True, text=True, check=True)
        t, c = r.stdout.split("RESULT")[1].split()
        out["restart"][key], cached["restart"][key] = float(t), int(c)
        print(key, {s: round(out[s][key], 3) for s in out}, flush=True)
    llm.close()
    return {"ttft_s": out, "cached_tokens": cached}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _raw_write(path: Path, payloads: list[bytes]) -> None:
    with open(path, "wb") as f:
        for p in payloads:
            f.write(p)
        f.flush()
        os.fsync(f.fileno())


def disk_bandwidth(root: Path, payloads: list[bytes], block_bytes: int, rounds: int) -> dict:
    """Best of `rounds` for the tier and for plain file I/O, interleaved (noisy disks)."""
    from kvmesh.kvstore.disk import DiskTier

    total = block_bytes * len(payloads)
    best = {"disk_store": 0.0, "disk_load": 0.0, "raw_write": 0.0, "raw_read": 0.0}
    for r in range(rounds):
        raw = root / f"raw-{r}.bin"
        os.sync()
        best["raw_write"] = max(best["raw_write"],
                                total / _timed(lambda raw=raw: _raw_write(raw, payloads)))
        drop_page_cache(root)
        best["raw_read"] = max(best["raw_read"], total / _timed(raw.read_bytes))
        raw.unlink()
        disk = DiskTier(root / f"tier-{r}", 4 * total, block_bytes)
        keys = [(r * 10**6 + i).to_bytes(16, "little") for i in range(len(payloads))]

        def store(disk: DiskTier = disk, keys: list[bytes] = keys) -> None:
            for k, p in zip(keys, payloads, strict=True):
                disk.write(k, p)  # type: ignore[arg-type]
            disk.drain(120)
            os.sync()  # durable, like the raw write's fsync

        best["disk_store"] = max(best["disk_store"], total / _timed(store))
        drop_page_cache(root)

        def load(disk: DiskTier = disk, keys: list[bytes] = keys) -> None:
            futures = [disk.read(k) for k in keys]  # type: ignore[arg-type]
            assert all(f.result() is not None for f in futures)

        best["disk_load"] = max(best["disk_load"], total / _timed(load))
        disk.close()
    return {k: v / 1e9 for k, v in best.items()}


def bandwidth(disk_root: Path, block_bytes: int = 737280, num_blocks: int = 512,
              rounds: int = 3) -> dict:
    import torch

    from kvmesh.config import TierConfig
    from kvmesh.kvstore.host import HostTier
    from kvmesh.kvstore.store import TieredStore

    total = block_bytes * num_blocks
    store = TieredStore(TierConfig(host_bytes=total), HostTier(total, block_bytes), (), 16)
    device = torch.randint(0, 255, (num_blocks, block_bytes), dtype=torch.uint8)
    keys = [i.to_bytes(16, "little") for i in range(num_blocks)]
    host_store = host_load = 0.0
    for _ in range(rounds):
        for k in keys:
            store.host.remove(k)  # type: ignore[arg-type]
        t = _timed(lambda: [store.offload(k, device[i]) for i, k in enumerate(keys)])  # type: ignore[arg-type]
        host_store = max(host_store, total / t / 1e9)
        store.pin(keys)  # type: ignore[arg-type]
        t = _timed(lambda: [store.load(k, device[i]) for i, k in enumerate(keys)])  # type: ignore[arg-type]
        host_load = max(host_load, total / t / 1e9)
    disk_root.mkdir(parents=True, exist_ok=True)
    d = disk_bandwidth(disk_root, [device[i].numpy().tobytes() for i in range(num_blocks)],
                       block_bytes, rounds)
    mem = max(memcpy_gbps() for _ in range(rounds))
    return {"host_store_gbps": host_store, "host_load_gbps": host_load,
            "disk_store_gbps": d["disk_store"], "disk_load_gbps": d["disk_load"],
            "memcpy_gbps": mem, "raw_file_write_gbps": d["raw_write"],
            "raw_file_read_gbps": d["raw_read"],
            "bw_ratio_host_store": host_store / mem, "bw_ratio_host_load": host_load / mem,
            "bw_ratio_disk_store": d["disk_store"] / d["raw_write"],
            "bw_ratio_disk_load": d["disk_load"] / d["raw_read"], "bytes_moved": total,
            "rounds": rounds}


def block_tokens(block_id: int) -> list[int]:
    rng = random.Random(block_id * 7919 + 17)
    return [rng.randrange(100, 40000) for _ in range(16)]


def mooncake(trace: Path, limit: int, tiers: bool, disk: Path) -> dict:
    """Replay in arrival order; each 512-token hash block becomes one 16-token block (1/32)."""
    kw = dict(host_bytes=1024 * 368640, disk_path=str(disk), disk_bytes=8 * 2**30) if tiers else {}
    llm = LLM(dtype="bfloat16", num_blocks=256, max_num_batched_tokens=2048, **kw)
    hit = prompt = 0
    with trace.open() as f:
        rows = [json.loads(line) for _, line in zip(range(limit), f, strict=False)]
    for row in rows:
        ids = [t for h in row["hash_ids"] for t in block_tokens(h)]
        ids = ids[: max(16, row["input_length"] // 32)]
        out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=2,
                                                 ignore_eos=True))[0]
        hit += out.num_cached_tokens
        prompt += len(ids)
    result = {"prompt_tokens": prompt, "hit_tokens": hit, "hit_ratio": hit / prompt,
              "device_hit_tokens": llm.engine.kv.num_hit_tokens}
    if llm.engine.store is not None:
        for s in llm.engine.store.all_stats():
            result[f"{s.name}_hit_tokens"] = s.hit_tokens
    llm.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--trace", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                           "traces" / "mooncake_conversation_trace.jsonl"))
    ap.add_argument("--trace-requests", type=int, default=300)
    ap.add_argument("--disk", default=None, help="directory for the disk tier (default: tmp)")
    ap.add_argument("--bandwidth-only", action="store_true")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    root = Path(args.disk or tempfile.mkdtemp(prefix="kvmesh-bench-"))
    bw = bandwidth(root / "bw")
    print(json.dumps(bw, indent=1), flush=True)
    if args.bandwidth_only:
        return
    src = ttft_by_source(lengths, root / "ttft", host_bytes=2 * 2**30)
    t = src["ttft_s"]
    figures = {**src, **bw,
               "ttft_ratio_host_4k": t["host"]["4k"] / t["cold"]["4k"],
               "ttft_ratio_disk_4k": t["disk"]["4k"] / t["cold"]["4k"],
               "ttft_ratio_restart_4k": t["restart"]["4k"] / t["cold"]["4k"],
               "ttft_ratio_device_4k": t["device"]["4k"] / t["cold"]["4k"]}
    trace = Path(args.trace)
    if trace.is_file():
        figures["mooncake"] = {
            "device_only": mooncake(trace, args.trace_requests, False, root / "mc-off"),
            "tiers_on": mooncake(trace, args.trace_requests, True, root / "mc-on"),
        }
    notes = {
        "ttft": "in-process LLM.generate with max_tokens=1, default dtype (float32 on CPU); "
                "restart = a fresh process whose only cache is the disk tier",
        "page_cache": "disk hits read files after posix_fadvise(DONTNEED) on every block file",
        "disk_bandwidth": "best of 3 interleaved rounds each: store = tier writes then "
                          "os.sync(), against one file written in the same block-sized chunks "
                          "then fsync'd; load = parallel verified reads after dropping the page "
                          "cache, against one plain read of the raw file",
        "mooncake": f"first {args.trace_requests} requests of the conversation trace in arrival "
                    "order, sequentially; lengths scaled 1/32 so one 512-token hash block is one "
                    "16-token kvmesh block; device pool 256 blocks (4,096 tokens), host 1,024 "
                    "blocks, bfloat16",
    }
    cfg = {"model": "smollm2-135m-instruct", "lengths": lengths, "block_size": 16,
           "disk_dir": str(root)}
    print(json.dumps({k: v for k, v in figures.items() if "ratio" in k}, indent=1))
    print("wrote", save("kv_tiers", cfg, figures, notes))


if __name__ == "__main__":
    main()
