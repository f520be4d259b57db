"""OpenAI response bodies and SSE chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from kvmesh.model.tokenizer import Tokenizer
from kvmesh.types import RequestDelta, TokenLogprobs


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _seen_prompts: set[int] = field(default_factory=set)

    def add(self, prompt_index: int, delta: RequestDelta) -> bool:
        """Count a delta. True if it is the first one seen for its prompt."""
        self.completion_tokens += len(delta.new_token_ids)
        if prompt_index in self._seen_prompts or not delta.num_prompt_tokens:
            return False
        self._seen_prompts.add(prompt_index)
        self.prompt_tokens += delta.num_prompt_tokens
        self.cached_tokens += delta.num_cached_tokens
        return True

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def finish_reason(delta: RequestDelta) -> str | None:
    if delta.finish_reason in (None, "stop", "length"):
        return delta.finish_reason
    return "abort" if delta.finish_reason == "abort" else "error"


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def _text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def completion(self, token_ids: list[int], entries: list[TokenLogprobs], offset: int):
        tokens, lps, tops, offsets = [], [], [], []
        for tid, entry in zip(token_ids, entries, strict=False):
            text = self._text(tid)
            tokens.append(text)
            lps.append(entry.get(tid))
            tops.append({self._text(t): v for t, v in entry.items()})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def chat(self, token_ids: list[int], entries: list[TokenLogprobs], top_n: int):
        content = []
        for tid, entry in zip(token_ids, entries, strict=False):
            text = self._text(tid)
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            content.append(
                {
                    "token": text,
                    "logprob": entry.get(tid),
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {
                            "token": self._text(t),
                            "logprob": v,
                            "bytes": list(self._text(t).encode()),
                        }
                        for t, v in ranked
                    ],
                }
            )
        return {"content": content}


def completion_body(
    rid: str, model: str, choices: list[Choice], usage: Usage, fmt: LogprobFormatter | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": fmt.completion(c.token_ids, c.logprobs, 0) if fmt else None,
            }
            for c in choices
        ],
        "usage": usage.body(),
    }


def chat_body(
    rid: str,
    model: str,
    choices: list[Choice],
    usage: Usage,
    fmt: LogprobFormatter | None,
    top_n: int,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": fmt.chat(c.token_ids, c.logprobs, top_n) if fmt else None,
            }
            for c in choices
        ],
        "usage": usage.body(),
    }


def chunk(
    rid: str,
    model: str,
    kind: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if with_usage_field or usage is not None:
        body["usage"] = usage
    return body
