"""Drives sessions against an endpoint: open-loop arrivals (Poisson with burstiness, or a
trace's own timestamps), or a closed loop at fixed concurrency. Bounded in count and time."""

from __future__ import annotations

import asyncio
import time

import httpx
from rich.progress import Progress

from kvmesh.bench.arrivals import LoadProfile, arrival_times
from kvmesh.bench.client import Endpoint, send
from kvmesh.bench.datasets import Session
from kvmesh.bench.records import RequestRecord


async def _session(
    client,
    ep: Endpoint,
    idx: int,
    s: Session,
    t0: float,
    profile: LoadProfile,
    records: list[RequestRecord],
    on_done,
) -> None:
    messages: list[dict[str, str]] = []
    if s.system:
        messages.append({"role": "system", "content": s.system})
    for turn_no, turn in enumerate(s.turns):
        if time.perf_counter() - t0 > profile.max_duration_s:
            return
        messages.append({"role": "user", "content": turn.user_text})
        rec = RequestRecord(idx, turn_no, time.perf_counter() - t0)
        records.append(rec)
        await send(client, ep, messages, turn.max_tokens, rec, t0, profile.ignore_eos,
                   f"session-{idx}")
        on_done()
        if not rec.ok:
            return
        messages.append({"role": "assistant", "content": rec.text})
        if s.think_s:
            await asyncio.sleep(s.think_s)


async def run_load(
    ep: Endpoint, sessions: list[Session], profile: LoadProfile, show_progress: bool = True
) -> tuple[list[RequestRecord], float]:
    """Run every session; returns the records and the wall time in seconds."""
    records: list[RequestRecord] = []
    starts = arrival_times(sessions, profile)
    total = sum(len(s.turns) for s in sessions)
    limit = asyncio.Semaphore(profile.concurrency or len(sessions) or 1)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    with Progress(disable=not show_progress, transient=True) as bar:
        task = bar.add_task("requests", total=total)
        async with httpx.AsyncClient(limits=limits, timeout=ep.timeout_s) as client:
            t0 = time.perf_counter()

            async def one(i: int, s: Session) -> None:
                await asyncio.sleep(max(0.0, starts[i] - (time.perf_counter() - t0)))
                async with limit:
                    await _session(
                        client, ep, i, s, t0, profile, records, lambda: bar.advance(task)
                    )

            await asyncio.wait_for(
                asyncio.gather(*(one(i, s) for i, s in enumerate(sessions))),
                timeout=profile.max_duration_s + ep.timeout_s,
            )
            duration = time.perf_counter() - t0
    return records, duration
