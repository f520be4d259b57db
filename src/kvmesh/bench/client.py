"""Streams one request to an OpenAI-compatible endpoint and times every chunk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from kvmesh.bench.records import RequestRecord


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str | None
    api: str = "chat"  # "chat" or "completions"
    api_key: str | None = None
    timeout_s: float = 600.0


def _payload(
    ep: Endpoint, messages: list[dict[str, str]], max_tokens: int, ignore_eos: bool
) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.0,
        "stream_options": {"include_usage": True},
    }
    if ep.model:
        body["model"] = ep.model
    if ignore_eos:
        body["ignore_eos"] = True
    if ep.api == "chat":
        body["messages"] = messages
        return "/v1/chat/completions", body
    body["prompt"] = "\n".join(m["content"] for m in messages)
    return "/v1/completions", body


def _chunk_text(data: dict[str, Any]) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "delta" in c:
        return c["delta"].get("content") or ""
    return c.get("text") or ""


async def send(
    client: httpx.AsyncClient,
    ep: Endpoint,
    messages: list[dict[str, str]],
    max_tokens: int,
    rec: RequestRecord,
    t0: float,
    ignore_eos: bool,
    session_id: str | None = None,
) -> None:
    """Stream one request into `rec`. `session_id` goes out as X-Session-Id (what the
    router's `session` policy sticks by)."""
    path, body = _payload(ep, messages, max_tokens, ignore_eos)
    headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
    if session_id is not None:
        headers["X-Session-Id"] = session_id
    start = time.perf_counter()
    rec.start_s = start - t0
    last = None
    try:
        async with client.stream(
            "POST", ep.base_url.rstrip("/") + path, json=body, headers=headers, timeout=ep.timeout_s
        ) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.retry_after = resp.headers.get("retry-after")
                rec.error = (await resp.aread()).decode(errors="replace")[:500]
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    rec.error = str(data["error"])
                    return
                now = time.perf_counter()
                if data.get("usage"):
                    u = data["usage"]
                    rec.prompt_tokens = u.get("prompt_tokens")
                    rec.output_tokens = u.get("completion_tokens") or rec.output_tokens
                    rec.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
                text = _chunk_text(data)
                if text:
                    if last is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                    rec.text += text
        rec.e2e_s = time.perf_counter() - start
        rec.ok = rec.ttft_s is not None
        if not rec.ok:
            rec.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
