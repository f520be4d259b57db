"""The mesh: TTFT by cache source, P2P bandwidth against a plain socket, and the Mooncake
conversation trace on three instances meshed vs isolated.

    python benchmarks/p2p.py [--lengths 2048,4096] [--repeats 3] [--trace-requests 240]

- TTFT (`kvmesh serve` A and B, default model, loopback): a fresh prompt of each length
  cold on A, then on B (its prefix fetched from A), then on A again after a filler prompt
  pushed it out of A's device pool into host memory (a local host hit). TTFT is the
  latency of a `max_tokens=1` completion; each source's `cached_tokens` is recorded.
- Bandwidth: a holder process serves N blocks of the default model's block size over the
  mesh protocol; this process fetches them as one run. The same bytes over a plain TCP
  socket (`sendall` per block, `recv_into` one buffer) between the same two kinds of
  process, interleaved rounds, are the limit it is compared with.
- Trace: the first requests of the conversation trace, in order, round-robin over three
  instances, sequentially; hit tokens by source (device, host, peer) from each instance's
  /metrics, meshed vs isolated.

Writes benchmarks/results/p2p.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import save  # noqa: E402
from tests.server_process import free_ports, serve  # noqa: E402

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / \
    "mooncake_conversation_trace.jsonl"
BLOCK = 16
BLOCK_BYTES = 737280  # the default model's 16-token block in float32 (30 layers, K and V)
SECRET = "p2p-benchmark-secret-0123456789"


# serving instances ---------------------------------------------------------------------

def _metrics(url: str) -> dict[str, float]:
    """Hit tokens by source: device (all cached tokens less the tiers'), host, disk, peer."""
    out = {"cached": 0.0}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("kvmesh:prefix_cache_hits_total"):
            out["cached"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("kvmesh:kv_tier_hit_tokens_total{"):
            tier = line.split('tier="', 1)[1].split('"', 1)[0]
            out[tier] = out.get(tier, 0.0) + float(line.rsplit(" ", 1)[1])
    out["device"] = out["cached"] - sum(v for k, v in out.items() if k not in ("cached",))
    return out


@contextlib.contextmanager
def instances(tmp: Path, n: int, meshed: bool, extra: list[str]):
    tmp.mkdir(parents=True, exist_ok=True)
    secret = tmp / "secret"
    secret.write_text(SECRET)
    all_ports = free_ports(2 * n)
    ports, http_ports = all_ports[:n], all_ports[n:]
    with contextlib.ExitStack() as stack:
        servers = []
        for i, port in enumerate(ports):
            args = list(extra)
            if meshed:
                args += ["--p2p-port", str(port), "--cluster-secret-file", str(secret)]
                if i:
                    args += ["--peers", f"127.0.0.1:{ports[0]}"]
            servers.append(stack.enter_context(serve(args, tmp, pin_float32=False,
                                                     port=http_ports[i])))
        if meshed:
            for s in servers:
                _until(lambda s=s: sum(m["linked"] for m in _mesh(s.url)["members"]) == n - 1,
                       f"{s.url} to link to every member")
        yield servers


def _mesh(url: str) -> dict:
    return httpx.get(url + "/mesh", timeout=10).json()


def _until(pred, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def _settled(url: str, holder: str, quiet_s: float = 0.5, timeout: float = 60.0) -> None:
    """Wait until `url`'s directory count of `holder`'s blocks stops changing."""
    last, since = -1, time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        n = next((m["blocks"] for m in _mesh(url)["members"] if m["node_id"] == holder), -1)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.05)


def complete(url: str, prompt: list[int], max_tokens: int = 1) -> tuple[float, int]:
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", timeout=600, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    took = time.perf_counter() - start
    r.raise_for_status()
    return took, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def ttft_by_source(tmp: Path, lengths: list[int], repeats: int, dtype: str) -> dict:
    longest = max(lengths)
    num_blocks = longest // BLOCK + 64  # the filler evicts a whole prompt from the device
    filler_len = (num_blocks - 8) * BLOCK
    extra = ["--dtype", dtype, "--block-size", str(BLOCK), "--num-blocks", str(num_blocks),
             "--host-bytes", str(2 << 30)]
    rng = random.Random(0)
    sources = ("cold", "peer", "local_host", "device")
    runs: dict[str, dict[str, list[float]]] = {s: {} for s in sources}
    cached: dict[str, dict[str, list[int]]] = {s: {} for s in sources}
    with instances(tmp / "ttft", 2, True, extra) as (a, b):
        a_id = _mesh(a.url)["me"]["node_id"]
        complete(a.url, [rng.randrange(100, 40000) for _ in range(64)])  # warm-up
        complete(b.url, [rng.randrange(100, 40000) for _ in range(64)])
        for n in lengths:
            key = f"{n // 1024}k"
            for s in sources:
                runs[s][key], cached[s][key] = [], []
            for _ in range(repeats):
                prompt = [rng.randrange(100, 40000) for _ in range(n)]
                filler = [rng.randrange(100, 40000) for _ in range(filler_len)]
                got = {"cold": complete(a.url, prompt)}
                _settled(b.url, a_id)
                got["peer"] = complete(b.url, prompt)
                complete(a.url, filler)  # pushes the prompt's blocks to A's host tier
                got["local_host"] = complete(a.url, prompt)
                got["device"] = complete(a.url, prompt)
                for s, (t, c) in got.items():
                    runs[s][key].append(t)
                    cached[s][key].append(c)
                print(key, {s: round(t, 3) for s, (t, _) in got.items()},
                      {s: c for s, (_, c) in got.items()}, flush=True)
    median = {s: {k: statistics.median(v) for k, v in runs[s].items()} for s in sources}
    return {"ttft_s": median, "ttft_runs_s": runs, "cached_tokens": cached,
            "num_blocks": num_blocks, "filler_tokens": filler_len}


# bandwidth -----------------------------------------------------------------------------

def _payloads(n: int, block_bytes: int) -> list[bytes]:
    rng = random.Random(1)
    base = rng.randbytes(block_bytes)
    return [i.to_bytes(8, "little") + base[8:] for i in range(n)]


def _keys(n: int) -> list[bytes]:
    return [(i + 1).to_bytes(16, "little") for i in range(n)]


class _Blocks:
    """LocalBlocks over a dict (the bandwidth processes have no engine)."""

    def __init__(self, blocks: dict[bytes, bytes], block_bytes: int):
        self.blocks, self.block_bytes = blocks, block_bytes

    def snapshot(self) -> concurrent.futures.Future:
        from kvmesh.engine.kv_events import KVSnapshot

        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(KVSnapshot("bench", 0, {"host": list(self.blocks)}))
        return fut

    def export(self, keys) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result([self.blocks[k] for k in keys if k in self.blocks])
        return fut

    def hottest(self, limit: int) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result([])  # no hand-off from a benchmark process
        return fut

    def adopt(self, blocks) -> concurrent.futures.Future:
        raise NotImplementedError


def _node(port: int, blocks: _Blocks, seeds: tuple[str, ...] = ()):
    from kvmesh.mesh.node import MeshConfig, MeshNode

    node = MeshNode(MeshConfig("127.0.0.1", port, SECRET.encode(), seeds), blocks)
    node.start()
    return node


def holder_main(port: int, raw_port: int, n: int, block_bytes: int) -> None:
    """The other process: a mesh node holding the blocks, and a plain socket server that
    sends the same bytes to each connection. Runs until stdin closes."""
    import logging
    import threading

    logging.basicConfig(level=logging.INFO, format="holder %(levelname)s %(message)s")
    payloads = _payloads(n, block_bytes)
    node = _node(port, _Blocks(dict(zip(_keys(n), payloads, strict=True)), block_bytes))

    def raw_server() -> None:
        with socket.create_server(("127.0.0.1", raw_port)) as srv:
            while True:
                conn, _ = srv.accept()
                with conn:
                    for p in payloads:
                        conn.sendall(p)

    threading.Thread(target=raw_server, daemon=True).start()
    print("READY", node.me.node_id, flush=True)
    sys.stdin.read()
    node.stop()


def _raw_fetch(port: int, total: int) -> float:
    buf = bytearray(total)
    view = memoryview(buf)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        while got < total:
            k = s.recv_into(view[got:], min(total - got, 4 << 20))
            if not k:
                raise ConnectionError("short raw transfer")
            got += k
    return time.perf_counter() - start


def bandwidth(n: int, block_bytes: int, rounds: int) -> dict:
    port, raw_port, my_port = free_ports(3)
    proc = subprocess.Popen([sys.executable, __file__, "--holder", str(port), str(raw_port),
                             str(n), str(block_bytes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    node = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == "READY", line
        holder = line[1]
        node = _node(my_port, _Blocks({}, block_bytes), (f"127.0.0.1:{port}",))
        keys = _keys(n)
        _until(lambda: node.holders(keys[-1]) == [holder], "the holder's directory")
        total = n * block_bytes
        p2p, raw = [], []
        for _ in range(2):  # warm-up: the allocator's first large buffers fault in pages
            [f.result(timeout=120) for f in node.request(holder, keys)]
            _raw_fetch(raw_port, total)
        for _ in range(rounds):
            start = time.perf_counter()
            got = [f.result(timeout=120) for f in node.request(holder, keys)]
            p2p.append(time.perf_counter() - start)
            assert all(g is not None and len(g) == block_bytes for g in got)
            del got
            raw.append(_raw_fetch(raw_port, total))
        p2p_gbps = [total / t / 1e9 for t in p2p]
        raw_gbps = [total / t / 1e9 for t in raw]
        return {"p2p_gbps": statistics.median(p2p_gbps),
                "raw_socket_gbps": statistics.median(raw_gbps),
                "bw_ratio_p2p": statistics.median(p2p_gbps) / statistics.median(raw_gbps),
                "p2p_gbps_runs": p2p_gbps, "raw_socket_gbps_runs": raw_gbps,
                "bytes_per_round": total, "block_bytes": block_bytes, "blocks": n,
                "checksum_failures": node.stats.checksum_failures}
    finally:
        if node is not None:
            node.stop()
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)


# trace ---------------------------------------------------------------------------------

def block_tokens(block_id: int) -> list[int]:
    rng = random.Random(block_id * 7919 + 17)
    return [rng.randrange(100, 40000) for _ in range(BLOCK)]


def trace_replay(tmp: Path, rows: list[dict], meshed: bool, dtype: str) -> dict:
    """Round-robin over three instances, one request at a time; lengths scaled 1/32 so a
    512-token hash block of the trace is one 16-token block here."""
    extra = ["--dtype", dtype, "--block-size", str(BLOCK), "--num-blocks", "512",
             "--host-bytes", str(768 << 20)]
    prompt_tokens = 0
    with instances(tmp / ("mesh" if meshed else "isolated"), 3, meshed, extra) as servers:
        for i, row in enumerate(rows):
            ids = [t for h in row["hash_ids"] for t in block_tokens(h)]
            ids = ids[: max(BLOCK, row["input_length"] // 32)]
            complete(servers[i % 3].url, ids, max_tokens=2)
            prompt_tokens += len(ids)
        per = [_metrics(s.url) for s in servers]
    sources = sorted({k for m in per for k in m} - {"cached"})
    hits = {s: int(sum(m.get(s, 0.0) for m in per)) for s in sources}
    total = int(sum(m["cached"] for m in per))
    return {"prompt_tokens": prompt_tokens, "hit_tokens": total,
            "hit_ratio": total / prompt_tokens, "hit_tokens_by_source": hits}


# main ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--bw-blocks", type=int, default=512)
    ap.add_argument("--bw-rounds", type=int, default=5)
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--trace-requests", type=int, default=240)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: ttft,bw,trace")
    ap.add_argument("--holder", nargs=4, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.holder:
        holder_main(*args.holder)
        return
    skip = {s for s in args.skip.split(",") if s}
    lengths = [int(x) for x in args.lengths.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-p2p-"))
    figures: dict = {}
    skipped: dict[str, str] = {}
    if "ttft" in skip:
        skipped["ttft_s"] = "skipped (--skip ttft)"
    else:
        figures.update(ttft_by_source(tmp, lengths, args.repeats, args.dtype))
        t = figures["ttft_s"]
        k = f"{max(lengths) // 1024}k"
        figures[f"ttft_ratio_peer_vs_cold_{k}"] = t["peer"][k] / t["cold"][k]
        figures[f"ttft_ratio_peer_vs_local_host_{k}"] = t["peer"][k] / t["local_host"][k]
    if "bw" in skip:
        skipped["p2p_gbps"] = "skipped (--skip bw)"
    else:
        figures.update(bandwidth(args.bw_blocks, BLOCK_BYTES, args.bw_rounds))
    trace = Path(args.trace)
    if "trace" in skip or not trace.is_file():
        skipped["mooncake"] = "skipped (--skip trace)" if "trace" in skip \
            else f"trace file {trace} not found"
    else:
        with trace.open() as f:
            rows = [json.loads(line) for _, line in zip(range(args.trace_requests), f,
                                                        strict=False)]
        figures["mooncake"] = {"isolated": trace_replay(tmp, rows, False, args.dtype),
                               "meshed": trace_replay(tmp, rows, True, args.dtype)}
        print(json.dumps(figures["mooncake"], indent=1), flush=True)
    notes = {
        "ttft": "latency of a max_tokens=1 /v1/completions on `kvmesh serve` (loopback), "
                "median of the repeats; each repeat is a fresh random-token prompt. "
                "local_host: A again after a filler prompt evicted it from A's device pool "
                "(write-back to host); device: A once more",
        "bandwidth": "one fetch of all blocks as one run (holder in another process, "
                     "dict-backed, no engine) vs the same bytes over a plain TCP socket "
                     "(sendall per block / recv_into one buffer); interleaved rounds, median",
        "trace": f"first {args.trace_requests} requests of the Mooncake conversation trace "
                 "in order, round-robin over 3 instances, one at a time; lengths scaled 1/32 "
                 "(one 512-token hash block = one 16-token block); device pool 512 blocks and "
                 "host tier 768 MiB per instance",
        "cpu_count": os.cpu_count(),
        **{f"not_measured_{k}": why for k, why in skipped.items()},
    }
    for key in skipped:
        figures.setdefault(key, None)
    cfg = {"model": "smollm2-135m-instruct", "lengths": lengths, "repeats": args.repeats,
           "dtype": args.dtype, "block_size": BLOCK}
    print(json.dumps({k: v for k, v in figures.items() if "ratio" in k or "gbps" in k},
                     indent=1))
    print("wrote", save("p2p", cfg, figures, notes))


if __name__ == "__main__":
    main()
