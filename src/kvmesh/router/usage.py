"""What a relayed answer says it used, so the router can settle a tenant's token charge.
Pure: it sees the bytes the proxy passes on, nothing else.

The router charges a tenant's token budget up front with an estimate (prompt tokens plus
`max_tokens` per choice) and, once the answer is over, squares it with the tokens used,
read from the answer's last bytes: the `usage` object of a JSON answer (OpenAI-style
servers, kvmesh included, put it last); in a stream, the final usage chunk
(`stream_options.include_usage`) or, from a kvmesh instance asked with the `USAGE_HEADER`
request header, the `: usage {...}` SSE comment that then ends the stream (clients skip
comment lines). An answer with no usage there keeps the estimate.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

USAGE_HEADER = "x-kvmesh-usage"  # sent by the router: "end a stream with its usage"
USAGE_COMMENT = b": usage "  # the SSE comment such a stream ends with
TAIL_BYTES = 16 << 10  # how much of an answer's end is kept: its usage is there
_DECODER = json.JSONDecoder()


class UsageTap:
    def __init__(self, is_sse: bool):
        self.is_sse = is_sse
        self._parts: deque[bytes] = deque()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._parts.append(chunk)
        self._size += len(chunk)
        while len(self._parts) > 1 and self._size - len(self._parts[0]) >= TAIL_BYTES:
            self._size -= len(self._parts.popleft())

    def used(self) -> int | None:
        """Tokens the answer says it used (prompt + completion), or None if it says not."""
        data = b"".join(self._parts)
        if not self.is_sse:
            return _tokens(_usage_object(data))
        for line in reversed(data.split(b"\n")):
            line = line.rstrip(b"\r")
            if line.startswith(USAGE_COMMENT):
                found = _tokens(_loads(line[len(USAGE_COMMENT):]))
            elif line.startswith(b"data:") and b'"usage"' in line:
                chunk = _loads(line[5:])
                found = _tokens(chunk.get("usage") if isinstance(chunk, dict) else None)
            else:
                continue
            if found is not None:
                return found
        return None


def _usage_object(data: bytes) -> Any:
    """The value after the last `"usage":` of a JSON text's tail, parsed alone."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    text = data[at + len(b'"usage"'):].decode("utf-8", "replace").lstrip()
    if not text.startswith(":"):
        return None
    try:
        value, _ = _DECODER.raw_decode(text[1:].lstrip())
    except (ValueError, RecursionError):
        return None
    return value


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # a partial line at the tail's cut, or not JSON
        return None


def _tokens(usage: Any) -> int | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int or min(prompt, completion) < 0:
        return None
    return prompt + completion
