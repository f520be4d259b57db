"""What the router reads of a request body to route it: its text, session, and block keys.

Lenient on purpose: the instance validates the request. Whatever the router cannot read
(a non-text content part, a malformed field) just routes without a cache estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvmesh.hashing import hash_blocks, make_namespace
from kvmesh.model.tokenizer import Tokenizer
from kvmesh.router.index import text_chunk_hashes
from kvmesh.router.policies import RouteRequest

log = logging.getLogger(__name__)
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True)
class PromptView:
    text: str
    messages: list[dict[str, str]] | None  # chat requests, as the chat template sees them
    prompt_ids: list[int] | None  # completions sent as token ids
    session_id: str | None
    body_salt: str | None
    max_tokens: int
    add_generation_prompt: bool = True
    template_kwargs: Mapping[str, Any] | None = None
    num_choices: int = 1  # `n`: the rate limit charges max_tokens for each


def _content_text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        if all(isinstance(t, str) for t in parts) and len(parts) == len(content):
            return "".join(parts)  # type: ignore[arg-type]
    return None


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]] | None:
    raw = body.get("messages")
    if not isinstance(raw, list):
        return None
    out = []
    for m in raw:
        text = _content_text(m.get("content")) if isinstance(m, dict) else None
        if text is None or not isinstance(m.get("role"), str):
            return None
        out.append({"role": m["role"], "content": text})
    return out


def view(body: Mapping[str, Any], headers: Mapping[str, str]) -> PromptView:
    messages = _messages(body)
    prompt = body.get("prompt")
    ids = prompt if isinstance(prompt, list) and all(type(t) is int for t in prompt) else None
    if messages is not None:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    else:
        text = prompt if isinstance(prompt, str) else ""
    session = headers.get(SESSION_HEADER) or body.get("user")
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    salt = body.get("cache_salt")
    kwargs = body.get("chat_template_kwargs")
    n = body.get("n")
    return PromptView(text, messages, ids, session if isinstance(session, str) else None,
                      salt if isinstance(salt, str) else None,
                      limit if isinstance(limit, int) and limit > 0 else 256,
                      body.get("add_generation_prompt", True) is not False,
                      kwargs if isinstance(kwargs, dict) else None,
                      n if type(n) is int and n > 1 else 1)


class KeyMaker:
    """Block keys exactly as an instance computes them: the same tokenizer and chat
    template, the instance's key scheme (from its /load) and the request's salt."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer

    def token_ids(self, v: PromptView) -> list[int] | None:
        if v.prompt_ids is not None:
            return v.prompt_ids
        if self.tokenizer is None:
            return None
        try:
            if v.messages is not None:
                return self.tokenizer.encode_chat(
                    v.messages, add_generation_prompt=v.add_generation_prompt,
                    **(v.template_kwargs or {}))
            return self.tokenizer.encode(v.text) if v.text else None
        except Exception as exc:  # noqa: BLE001 - the instance will say what is wrong
            log.debug("cannot tokenize for routing: %s", exc)
            return None

    def route_request(self, v: PromptView, salt: str | None,
                      scheme: tuple[str, str, str, int] | None) -> RouteRequest:
        ids = self.token_ids(v) if scheme is not None else None
        num_tokens = len(ids) if ids is not None else len(v.text) // 4
        keys: list[bytes] = []
        block_size = 16
        if ids is not None and scheme is not None:
            model_id, kv_dtype, layout, block_size = scheme
            ns = make_namespace(model_id, kv_dtype, layout, salt)
            # never the last token's block: an instance always recomputes that one
            keys = list(hash_blocks(ns, ids[: max(0, len(ids) - 1)], block_size))
        return RouteRequest(v.session_id, ids or (), num_tokens, keys,
                            text_chunk_hashes(v.text), block_size)
