"""OpenAI response bodies and SSE chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from kvmesh.model.tokenizer import Tokenizer
from kvmesh.server.tools import ToolParser
from kvmesh.types import RequestDelta, TokenLogprobs


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage_comment(usage: dict[str, Any]) -> str:
    """A stream's usage as an SSE comment (`: usage {...}`), for a router that asked
    (`kvmesh.router.usage.USAGE_HEADER`) when its client did not ask for the usage chunk:
    clients skip comment lines."""
    return f": usage {json.dumps(usage, separators=(',', ':'))}\n\n"


@dataclass
class Choice:
    """One choice as it builds up. `text` is all generated text; with tools, `content` is
    what the parser let through and `pending` what the last delta added to it."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    parser: ToolParser | None = None
    content: str = ""
    pending: str = ""

    def add_text(self, new_text: str) -> None:
        self.text += new_text
        self.pending = self.parser.feed(new_text) if self.parser else new_text
        self.content += self.pending

    def finish(self, reason: str | None) -> None:
        if self.parser is not None:
            tail = self.parser.finish()
            self.pending += tail
            self.content += tail
            if self.parser.calls and reason == "stop":
                reason = "tool_calls"
        self.finish_reason = reason

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return self.parser.calls if self.parser else []

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["content"] = self.content or None
            msg["tool_calls"] = self.tool_calls
        return msg


def chat_delta(choice: Choice, first: bool) -> dict[str, Any]:
    """A streamed chat delta: new content, and on the last one the choice's tool calls."""
    body: dict[str, Any] = {"content": choice.pending}
    if first:
        body["role"] = "assistant"
    if choice.finish_reason is not None and choice.tool_calls:
        body["tool_calls"] = [{"index": i, **c} for i, c in enumerate(choice.tool_calls)]
    return body


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    result_cache_hit: bool = False
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
            "result_cache_hit": self.result_cache_hit,
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
                "message": c.message(),
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
