"""The router's reading of what a relayed answer used (pure: bytes in, tokens out)."""

from __future__ import annotations

import json

from kvmesh.router.usage import TAIL_BYTES, UsageTap


def _sse(*events: str) -> bytes:
    return "".join(f"{e}\n\n" for e in events).encode()


def _fed(is_sse: bool, data: bytes, size: int) -> UsageTap:
    tap = UsageTap(is_sse)
    for i in range(0, len(data), size):  # any split: events cross chunk boundaries
        tap.feed(data[i:i + size])
    return tap


def test_a_json_answer_says_its_usage():
    body = json.dumps({"choices": [{"text": "usage"}],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 5}}).encode()
    assert _fed(False, body, 7).used() == 17
    assert _fed(False, b'{"usage": null}', 4).used() is None
    assert _fed(False, b'{"choices": [', 4).used() is None  # cut short
    assert UsageTap(False).used() is None


def test_a_stream_says_it_in_its_usage_chunk_or_its_usage_comment():
    chunk = 'data: {"choices":[{"text":"the \\"usage\\" word"}],"usage":null}'
    final = 'data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":9}}'
    comment = ': usage {"prompt_tokens":30,"completion_tokens":4,"total_tokens":34}'
    for size in (1, 5, 64, 10_000):
        assert _fed(True, _sse(chunk, chunk, final, "data: [DONE]"), size).used() == 39
        assert _fed(True, _sse(chunk, comment, "data: [DONE]"), size).used() == 34
        assert _fed(True, _sse(chunk, chunk, "data: [DONE]"), size).used() is None
    bad = ': usage {"prompt_tokens":-1,"completion_tokens":4}'
    assert _fed(True, _sse(chunk, bad, "data: [DONE]"), 9).used() is None


def test_a_long_stream_keeps_only_its_tail():
    chunk = 'data: {"choices":[{"text":"' + "x" * 100 + '"}]}'
    comment = ': usage {"prompt_tokens":1,"completion_tokens":1000}'
    tap = _fed(True, _sse(*[chunk] * 1000, comment, "data: [DONE]"), 333)
    assert tap.used() == 1001
    assert tap._size < TAIL_BYTES + 333  # bounded, whatever the stream's length
