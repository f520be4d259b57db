"""The router: routing gain, added latency, and proxy throughput.

    python benchmarks/router.py [--repeats 2] [--workload pressure|light] [--sessions N] ...

1. Routing gain. Three `kvmesh serve` instances (default model, one thread each; KV
   events on for the kv policy only, so round_robin and prefix run in front of
   instances as they would in front of another engine) and `kvmesh router` on
   loopback, under `kvmesh bench`'s runner: multi-turn chat sessions whose system
   prompts come from a few shared groups. Each policy (round_robin, prefix, kv) gets
   fresh instances (cold caches) and the same sessions, in the same run; the order of
   policies rotates per repeat. Hit tokens are the instances' own `cached_tokens`.
   A routing gain is a capacity gain: with an unbounded cache every policy ends up
   hitting most prefixes somewhere (`--num-blocks 0`), so each instance's device KV is
   held below the working set. Two presets (`--workload`; any flag overrides one
   setting):
   - `pressure` (default): 24 sessions of 6 turns, 128-token replies, 0.2 sessions/s,
     0.5 s between a reply and the next turn, 6 groups sharing 150-word system
     prompts, 200 KV blocks (3,200 tokens) per instance. The histories of the sessions
     open at once fit in the three instances together, not in one: where a turn lands
     decides whether its history is still cached, and round robin's copies of every
     history on every instance evict each other. On the 2-core Xeon and Zen 4 machines
     the offered prefill is past what round robin's recomputation serves (its TTFT
     queues) and within what the instances serve once histories are reused; on a 2-core
     Zen 1 it is far past what round robin serves (its TTFT p50 was 52 s there, every
     cache turning over before its session came back), and `light` is the workload for
     such a machine.
   - `light`: 12 sessions at 0.05/s, 64-token replies, a user pausing 20 s between a
     reply and the next turn (so several sessions are open at once and their turns
     interleave, as a chat service's do), 4 groups of 50-word system prompts (about 15%
     of the reusable tokens: in the Mooncake conversation trace, ../shared/traces, 86%
     of the prefix-hit blocks are held by fewer than 20 requests and 11% by 100 or
     more, benchmarks/trace_sharing.py), 128 blocks per instance (about half the working
     set of the sessions open at once). Here round robin sends a third of the turns
     home and finds older copies of a history elsewhere: it gets about half of the
     reuse any cache could give, so twice its hit tokens needs about all of it
     (docs/router.md).
2. Added latency. One instance; streamed requests alternate between a direct
   connection and the router (policy kv, so tokenizing and key hashing are included),
   each prompt new to the cache. TTFT and inter-token latency, p50 and p99, both sides.
3. Proxy throughput and the added latency itself (`router_latency.py`). A stub
   upstream that answers at once (benchmarks/stub_openai.py): `--stub-pairs`
   sequential streamed requests alternating direct and through the router (policy
   prefix), then requests/s at 64 concurrent clients, both ways. Client, router and
   stub share this machine's cores. The headline `router_added_*` figures come from
   here: with the model upstream, TTFT itself varies by about 100 ms, far more than
   what the router adds.

Writes benchmarks/results/router.json (`--name` for another workload's file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import RESULTS, save  # noqa: E402
from router_latency import percentiles, proxy_throughput, stream_once  # noqa: E402
from tests.server_process import free_ports, serve  # noqa: E402

from kvmesh.bench.client import Endpoint  # noqa: E402
from kvmesh.bench.datasets import Session, Turn, words  # noqa: E402
from kvmesh.bench.metrics import percentile  # noqa: E402
from kvmesh.bench.runner import LoadProfile, run_load  # noqa: E402

POLICIES = ("round_robin", "prefix", "kv")
INSTANCE_ARGS = ["--num-threads", "1"]


def sessions(n: int, turns: int, groups: int, output_len: int, seed: int,
             think_s: float, system_words: int) -> list[Session]:
    """Chat sessions: a system prompt shared by each group, then `turns` user turns; each
    turn's prompt is the whole conversation so far, sent `think_s` after the last reply."""
    rng = random.Random(seed)
    systems = [words(rng, system_words) for _ in range(groups)]
    return [Session([Turn(words(rng, 60), output_len) for _ in range(turns)],
                    system=systems[i % groups], think_s=think_s) for i in range(n)]


@contextlib.contextmanager
def mesh(tmp: Path, policy: str, num_instances: int = 3, extra: tuple[str, ...] = ()):
    """Instances and a router. Only `kv` gets KV events: the others run in front of
    instances that publish none, as they would in front of another engine."""
    ports = free_ports(2 * num_instances)  # HTTP and KV events, all distinct
    with contextlib.ExitStack() as stack:
        insts = [stack.enter_context(serve(
            [*INSTANCE_ARGS, *extra, *(("--kv-events-port", str(ports[num_instances + i]))
                                       if policy == "kv" else ())], tmp,
            wait=None, port=ports[i]))
            for i in range(num_instances)]
        for inst in insts:
            inst.wait()
        router = stack.enter_context(serve(
            ["--instances", ",".join(i.url for i in insts), "--policy", policy,
             "--poll-interval-s", "0.2"], tmp, wait="/health", command="router"))
        time.sleep(1.0)  # KV feeds subscribed and synced
        yield router, insts


def reuse_ceiling(records: list, work: list[Session], block_size: int = 16) -> int:
    """Hit tokens one infinite cache would give this run (an estimate from the records): a
    turn reuses the previous turn's prompt and reply, a first turn its group's system
    prompt once any earlier session of the group has run; whole blocks, never the last
    token."""
    from kvmesh.model.registry import resolve_model
    from kvmesh.model.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model("smollm2-135m-instruct", progress=False).path)
    system_tokens = {s.system: len(tok.encode_chat([{"role": "system", "content": s.system}],
                                                   add_generation_prompt=False))
                     for s in work}
    by_turn = {(r.session, r.turn): r for r in records if r.ok}
    seen: set[str | None] = set()
    total = 0
    for r in sorted(by_turn.values(), key=lambda r: r.start_s):
        prev = by_turn.get((r.session, r.turn - 1))
        if prev is not None:
            reuse = prev.prompt_tokens + prev.output_tokens
        else:
            system = work[r.session].system
            reuse = system_tokens[system] if system in seen else 0
            seen.add(system)
        total += min(reuse, r.prompt_tokens - 1) // block_size * block_size
    return total


def routing_run(tmp: Path, policy: str, work: list[Session], rate: float,
                extra: tuple[str, ...] = ()) -> dict:
    with mesh(tmp, policy, extra=extra) as (router, insts):
        profile = LoadProfile(rate=rate, ignore_eos=True, seed=3, max_duration_s=900)
        records, duration = asyncio.run(run_load(Endpoint(router.url, None, "chat"), work,
                                                 profile, show_progress=False))
        served = [i.metric("request_success_total") for i in insts]
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {"policy": policy, "completed": len(ok), "failed": len(records) - len(ok),
            "hit_tokens": sum(r.cached_tokens or 0 for r in ok),
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
            "ttft_p99_s": percentile(ttft, 99),
            "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
            "duration_s": duration, "requests_per_instance": served,
            "ttfts_s": [round(t, 4) for t in ttft],
            "ceiling_hit_tokens": reuse_ceiling(records, work)}


def routing_gain(tmp: Path, args) -> dict:
    work = sessions(args.sessions, args.turns, args.groups, args.output_len, seed=1,
                    think_s=args.think_s, system_words=args.system_words)
    runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for rep in range(args.repeats):
        order = POLICIES[rep % 3:] + POLICIES[: rep % 3]
        for policy in order:
            runs[policy].append(routing_run(tmp, policy, work, args.rate, instance_extra(args)))
            print(policy, {k: runs[policy][-1][k] for k in (
                "hit_tokens", "ceiling_hit_tokens", "ttft_p50_s", "ttft_p99_s", "failed")})
    return runs


def instance_extra(args) -> tuple[str, ...]:
    """Per-instance KV capacity for the gain runs (unset: the engine's default)."""
    return ("--num-blocks", str(args.num_blocks)) if args.num_blocks else ()


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return statistics.median(vals) if vals else None


def overhead(tmp: Path, n: int) -> dict:
    rng = random.Random(7)
    with mesh(tmp, "kv", num_instances=1) as (router, insts), httpx.Client(timeout=120) as c:
        direct_url = insts[0].url
        sides: dict[str, dict[str, list[float]]] = {
            s: {"ttft": [], "itl": []} for s in ("direct", "router")}
        for i in range(n + 2):
            for side, url in (("direct", direct_url), ("router", router.url))[:: 1 - 2 * (i % 2)]:
                ttft, itl = stream_once(c, url, words(rng, 60))
                if i >= 2:  # the first two pairs warm up
                    sides[side]["ttft"].append(ttft)
                    sides[side]["itl"].extend(itl)
    out: dict = {"num_requests_per_side": n, "upstream": "kvmesh serve, default model"}
    percentiles(out, sides)
    return out


_RATIOS = tuple(f"{kind}_{p}_vs_round_robin{runs}" for p in ("kv", "prefix")
                for kind in ("hit_tokens_ratio", "ttft_p99_ratio") for runs in ("", "_runs"))
_RATIOS += tuple(f"ttft_p99_ratio_{p}_vs_round_robin_pooled" for p in ("kv", "prefix"))
PARTS = {  # the figures (and notes) each part writes
    "gain": (("round_robin", "prefix", "kv", *_RATIOS), ("gain", "capacity")),
    "overhead": (("overhead", "router_added_p99_ms_model_upstream",
                  "router_added_paired_median_ms_model_upstream",
                  "router_added_itl_p99_ms_model_upstream"), ()),
    "proxy": (("proxy", "router_rps", "router_added_p99_ms", "router_added_p50_ms",
               "router_added_itl_p99_ms"), ("added_latency",)),
}


def _carry_over(name: str, skip: set[str], figures: dict, notes: dict) -> None:
    """A run that skips parts keeps the previous file's figures for them, each part's
    provenance (commit, date, machine, command) in notes.carried_over."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    old_notes = old.get("notes", {})
    carried = {}
    for part in sorted(skip & PARTS.keys()):
        keys, note_keys = PARTS[part]
        if not all(k in old["figures"] for k in keys):
            continue  # that file did not run the part (or an older format): nothing kept
        figures.update({k: old["figures"][k] for k in keys})
        notes.update({k: old_notes[k] for k in note_keys if k in old_notes})
        carried[part] = old_notes.get("carried_over", {}).get(part) or {
            k: old.get(k) for k in ("git_commit", "created", "machine", "command")}
    if carried:
        notes["carried_over"] = carried


# The gain workload's presets (`--workload`); each setting can still be given on its own.
WORKLOADS: dict[str, dict[str, float | int]] = {
    # KV pressure, the default: 24 sessions of 6 turns with 128-token replies, 0.2 sessions/s
    # with 0.5 s pauses, 6 groups sharing 150-word system prompts, 200 blocks per instance
    "pressure": {"sessions": 24, "groups": 6, "turns": 6, "output_len": 128, "rate": 0.2,
                 "system_words": 150, "think_s": 0.5, "num_blocks": 200},
    # light: 12 sessions at 0.05/s with 20 s pauses, 4 groups of 50 words, 128 blocks
    "light": {"sessions": 12, "groups": 4, "turns": 6, "output_len": 64, "rate": 0.05,
              "system_words": 50, "think_s": 20.0, "num_blocks": 128},
}


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The gain workload's settings (router_sim.py runs the same workload): a preset
    (`--workload`), any of whose settings a flag overrides; `workload_args` fills them."""
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="pressure",
                    help="preset: pressure (caches hold a third of the open histories; "
                         "router.py's default) or light (router_sim.py's default); see "
                         "router.py's docstring")
    ap.add_argument("--sessions", type=int)
    ap.add_argument("--groups", type=int)
    ap.add_argument("--turns", type=int)
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--rate", type=float, help="sessions started per second")
    ap.add_argument("--system-words", type=int,
                    help="length of each group's shared system prompt, in words")
    ap.add_argument("--think-s", type=float,
                    help="a user's pause between a reply and the next turn")
    ap.add_argument("--num-blocks", type=int,
                    help="device KV blocks per instance in the gain runs (0: engine default)")


def workload_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the workload settings no flag gave from the chosen preset."""
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    add_workload_args(ap)
    ap.add_argument("--overhead-requests", type=int, default=60)
    ap.add_argument("--proxy-requests", type=int, default=2000)
    ap.add_argument("--stub-pairs", type=int, default=1000,
                    help="sequential direct/router request pairs for the added latency")
    ap.add_argument("--skip", default="", help="comma-separated: gain,overhead,proxy")
    ap.add_argument("--name", default=None,
                    help="results file name (default: router, or router_light for "
                         "--workload light)")
    args = workload_args(ap.parse_args())
    args.name = args.name or ("router" if args.workload == "pressure" else "router_light")
    skip = set(args.skip.split(","))
    tmp = Path("/tmp/kvmesh-router-bench")
    tmp.mkdir(exist_ok=True)
    figures: dict = {}
    notes: dict = {"cpu_sharing": "instances, router and client share this machine's cores"}
    if "gain" not in skip:
        runs = routing_gain(tmp, args)
        for policy, rows in runs.items():
            figures[policy] = {k: _median(rows, k) for k in
                               ("hit_tokens", "prompt_tokens", "ceiling_hit_tokens",
                                "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_mean_s",
                                "completed", "failed")}
            figures[policy]["fraction_of_ceiling"] = statistics.median(
                r["hit_tokens"] / r["ceiling_hit_tokens"] for r in rows)
            pooled = [t for r in rows for t in r["ttfts_s"]]
            figures[policy]["ttft_p99_pooled_s"] = percentile(pooled, 99)
            figures[policy]["ttft_p50_pooled_s"] = percentile(pooled, 50)
            figures[policy]["runs"] = rows
        rr = figures["round_robin"]
        for p in ("kv", "prefix"):
            ratios_hit = [k["hit_tokens"] / r["hit_tokens"] for k, r in
                          zip(runs[p], runs["round_robin"], strict=True) if r["hit_tokens"]]
            ratios_p99 = [k["ttft_p99_s"] / r["ttft_p99_s"] for k, r in
                          zip(runs[p], runs["round_robin"], strict=True)
                          if k["ttft_p99_s"] is not None and r["ttft_p99_s"]]
            # null where no pair has a ratio (round robin hit nothing, or no request ended)
            figures[f"hit_tokens_ratio_{p}_vs_round_robin"] = (
                statistics.median(ratios_hit) if ratios_hit else None)
            figures[f"ttft_p99_ratio_{p}_vs_round_robin"] = (
                statistics.median(ratios_p99) if ratios_p99 else None)
            figures[f"hit_tokens_ratio_{p}_vs_round_robin_runs"] = ratios_hit
            # one run's p99 (72 requests by default) is nearly its slowest request; over
            # every repeat's requests together it rests on a few more
            pooled_rr, pooled_p = rr["ttft_p99_pooled_s"], figures[p]["ttft_p99_pooled_s"]
            figures[f"ttft_p99_ratio_{p}_vs_round_robin_pooled"] = (
                pooled_p / pooled_rr if pooled_p is not None and pooled_rr else None)
            figures[f"ttft_p99_ratio_{p}_vs_round_robin_runs"] = ratios_p99
        notes["gain"] = (f"{args.workload} workload: {args.sessions} sessions x "
                         f"{args.turns} turns, {args.groups} shared system prompts of "
                         f"{args.system_words} words, {args.rate} sessions/s, {args.think_s} s "
                         "between a reply and the next turn; medians over "
                         f"{args.repeats} repeats (the ratios: medians of each run's ratio; "
                         "*_pooled: the p99 of every repeat's requests together); "
                         f"round_robin hit tokens {rr['hit_tokens']}")
        notes["instances"] = (
            "kvmesh serve, default model, one thread each; KV events on (--kv-events-port) "
            "only for the kv policy. round_robin and prefix run in front of instances that "
            "publish no KV events, the stand-in for another OpenAI-compatible engine: prefix "
            "uses the prompts it routed and the load figures (/load here; its own in-flight "
            "count in front of a server without /load)")
        if args.num_blocks:
            notes["capacity"] = (
                f"each instance's device KV holds {args.num_blocks} blocks of 16 tokens and "
                "no host tier. Sized so the sessions' histories fit in the three instances "
                "together but not in one, where a turn lands decides whether its history "
                "is still cached. With the default 2 GiB every instance holds every history, and "
                "round robin already finds most of the reuse (router_long.json).")
    if "overhead" not in skip:
        over = figures["overhead"] = overhead(tmp, args.overhead_requests)
        figures["router_added_p99_ms_model_upstream"] = over["added_ttft_p99_ms"]
        figures["router_added_paired_median_ms_model_upstream"] = over[
            "added_ttft_paired_median_ms"]
        figures["router_added_itl_p99_ms_model_upstream"] = over["added_itl_p99_ms"]
    if "proxy" not in skip:
        figures["proxy"] = proxy_throughput(tmp, args.proxy_requests, max(2, args.repeats),
                                            args.stub_pairs)
        figures["router_rps"] = figures["proxy"]["router_rps_median"]
        latency = figures["proxy"]["latency"]
        figures["router_added_p99_ms"] = latency["added_ttft_p99_ms"]
        figures["router_added_p50_ms"] = latency["added_ttft_p50_ms"]
        figures["router_added_itl_p99_ms"] = latency["added_itl_p99_ms"]
        notes["added_latency"] = (
            "router_added_* come from the stub upstream (part 3): a difference of p99s can "
            "only resolve milliseconds where the upstream itself is steady. With the model "
            "upstream (part 2, *_model_upstream) one TTFT varies by about 100 ms, so over "
            f"{args.overhead_requests} requests a side neither the p99 difference nor the "
            "paired median resolves a few milliseconds (the paired median moved between "
            "2.6 and 11 ms across four runs of the same code on one machine).")
    if skip & PARTS.keys():
        _carry_over(args.name, skip, figures, notes)
    path = save(args.name, {"model": "smollm2-135m-instruct", "instances": 3,
                           "instance_args": INSTANCE_ARGS, **vars(args)}, figures, notes)
    print(path)


if __name__ == "__main__":
    main()
