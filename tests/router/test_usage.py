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
    # a long answer: only its tail is kept, and the usage at its end is read from it
    long = json.dumps({"choices": [{"text": "y" * 100_000}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    tap = _fed(False, long, 1000)
    assert tap.used() == 7 and tap._size < TAIL_BYTES + 1000
    # hostile bodies: deep nesting, or no object after the key, say nothing
    deep = b"{\"usage\": " + b"[" * 5000 + b"]" * 5000 + b"}"  # in the tail, too deep
    assert _fed(False, deep, 4096).used() is None
    assert _fed(False, b'{"usage" "x"}', 3).used() is None
    assert _fed(True, _sse(": usage " + "[" * 5000 + "]" * 5000), 4096).used() is None


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
