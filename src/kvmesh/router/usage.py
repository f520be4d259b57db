"""What a relayed answer says it used, so the router can settle a tenant's token charge.
Pure: it sees the bytes the proxy passes on, nothing else.

The router charges a tenant's token budget up front with an estimate (prompt tokens plus
`max_tokens` per choice) and, once the answer is over, squares it with the tokens used:
`usage` of a JSON answer; in a stream, the final usage chunk (`stream_options.
include_usage`) or, from a kvmesh instance, the `: usage {...}` SSE comment it ends every
stream with (clients ignore comment lines). An answer with no usage in it (another
engine's stream without include_usage, or a stream cut short) keeps the estimate.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

USAGE_COMMENT = b": usage "  # the SSE comment a kvmesh stream ends with
TAIL_BYTES = 16 << 10  # a stream's usage is in its last events
MAX_JSON_BYTES = 8 << 20  # a bigger JSON answer is passed on, not parsed


class UsageTap:
    def __init__(self, is_sse: bool):
        self.is_sse = is_sse
        self._parts: deque[bytes] = deque()
        self._size = 0
        self._too_big = False

    def feed(self, chunk: bytes) -> None:
        if self._too_big:
            return
        self._parts.append(chunk)
        self._size += len(chunk)
        if self.is_sse:
            while len(self._parts) > 1 and self._size - len(self._parts[0]) >= TAIL_BYTES:
                self._size -= len(self._parts.popleft())
        elif self._size > MAX_JSON_BYTES:
            self._too_big = True
            self._parts.clear()

    def used(self) -> int | None:
        """Tokens the answer says it used (prompt + completion), or None if it says not."""
        if self._too_big or not self._parts:
            return None
        data = b"".join(self._parts)
        if not self.is_sse:
            return _tokens(_json(data))
        for line in reversed(data.split(b"\n")):
            line = line.rstrip(b"\r")
            if line.startswith(USAGE_COMMENT):
                found = _tokens(_json(line[len(USAGE_COMMENT):]))
            elif line.startswith(b"data:") and b'"usage"' in line:
                found = _tokens(_json(line[5:]))
            else:
                continue
            if found is not None:
                return found
        return None


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # a partial line at the tail's cut, or not JSON at all
        return None


def _tokens(doc: Any) -> int | None:
    usage = doc.get("usage", doc) if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int or min(prompt, completion) < 0:
        return None
    return prompt + completion
