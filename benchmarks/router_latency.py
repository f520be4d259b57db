"""The router's own cost, with a stub upstream that answers at once
(benchmarks/stub_openai.py): the latency it adds to a streamed request, and the requests
per second one router process proxies. Part 3 of benchmarks/router.py, which runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.server_process import free_port, serve  # noqa: E402

from kvmesh.bench.metrics import percentile  # noqa: E402


def stream_once(client: httpx.Client, url: str, prompt: str) -> tuple[float, list[float]]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
            "temperature": 0, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    times = []
    with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
    return times[0] - start, [b - a for a, b in zip(times, times[1:], strict=False)]


def percentiles(out: dict, sides: dict[str, dict[str, list[float]]]) -> None:
    for side, d in sides.items():
        for kind, vals in d.items():
            for p in (50, 99):
                out[f"{side}_{kind}_p{p}_ms"] = percentile(vals, p) * 1000
    for kind in ("ttft", "itl"):
        for p in (50, 99):
            out[f"added_{kind}_p{p}_ms"] = (out[f"router_{kind}_p{p}_ms"]
                                            - out[f"direct_{kind}_p{p}_ms"])
    pairs = [r - d for d, r in zip(sides["direct"]["ttft"], sides["router"]["ttft"],
                                   strict=True)]
    out["added_ttft_paired_median_ms"] = statistics.median(pairs) * 1000


def stub_latency(url: str, router_url: str, n: int) -> dict:
    """Sequential streamed requests to an upstream that answers at once, alternating
    direct and through the router: what the router itself adds."""
    sides: dict[str, dict[str, list[float]]] = {
        s: {"ttft": [], "itl": []} for s in ("direct", "router")}
    with httpx.Client(timeout=30) as c:
        for i in range(n + 20):
            for side, u in (("direct", url), ("router", router_url))[:: 1 - 2 * (i % 2)]:
                ttft, itl = stream_once(c, u, "hello")
                if i >= 20:
                    sides[side]["ttft"].append(ttft)
                    sides[side]["itl"].extend(itl)
    out: dict = {"num_requests_per_side": n, "upstream": "benchmarks/stub_openai.py"}
    percentiles(out, sides)
    return out


async def _hammer(url: str, n: int, concurrency: int) -> tuple[float, dict[str, int]]:
    """Completed requests per second, and what failed (by error kind)."""
    body = {"messages": [{"role": "user", "content": "hello " * 50}], "stream": True}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def one() -> bool:
            try:
                async with sem, client.stream("POST", url + "/v1/chat/completions",
                                              json=body) as resp:
                    async for _ in resp.aiter_raw():
                        pass
                    if resp.status_code == 200:
                        return True
                    kind = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                kind = type(exc).__name__
            errors[kind] = errors.get(kind, 0) + 1
            return False

        await asyncio.gather(*(one() for _ in range(50)))  # warm up
        errors.clear()
        start = time.perf_counter()
        ok = sum(await asyncio.gather(*(one() for _ in range(n))))
        return ok / (time.perf_counter() - start), errors


def proxy_throughput(tmp: Path, n: int, repeats: int, pairs: int) -> dict:
    port = free_port()
    stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stub_openai.py"),
                             str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.1)
        with serve(["--instances", url, "--policy", "prefix"], tmp, wait="/health",
                   command="router") as router:
            latency = stub_latency(url, router.url, pairs)
            direct, routed, errors = [], [], []
            for _ in range(repeats):
                for side, target in ((direct, url), (routed, router.url)):
                    rps, errs = asyncio.run(_hammer(target, n, 64))
                    side.append(rps)
                    errors.append({"side": "direct" if side is direct else "router", **errs})
    finally:
        stub.terminate()
        stub.wait()
    return {"direct_rps": direct, "router_rps": routed,
            "router_rps_median": statistics.median(routed),
            "direct_rps_median": statistics.median(direct),
            "requests_per_run": n, "concurrency": 64, "latency": latency,
            "errors_per_run": errors}
