"""The result cache: its byte bound under any sequence of operations (hypothesis), and a
real server answering repeats from it, streaming and not, per tenant, with opt-out."""

from __future__ import annotations

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.server.result_cache import ResultCache, make_result
from kvmesh.types import RequestDelta
from tests.server_process import serve

MODEL = "tiny"


def _result(n_deltas: int, text_len: int):
    deltas = [RequestDelta("r", 0, (1, 2), "x" * text_len,
                           "stop" if i == n_deltas - 1 else None) for i in range(n_deltas)]
    return make_result([deltas])


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 4000),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(1, 6),
                              st.integers(0, 300)), max_size=60))
def test_the_cache_never_exceeds_its_bound_and_keeps_what_fits(capacity, ops):
    cache = ResultCache(capacity)
    for is_put, key, n, length in ops:
        if is_put:
            result = _result(n, length)
            kept = cache.put(key, result)
            assert kept == (result.num_bytes <= capacity)
            if kept:  # the newest entry is never the one evicted
                assert cache.get(key) is result
        else:
            got = cache.get(key)
            assert got is None or got.num_bytes > 0
        cache.check_integrity()
        assert cache.num_bytes <= capacity


def test_refuses_a_negative_bound():
    with pytest.raises(ValueError, match=">= 0"):
        ResultCache(-1)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = ["--model", str(tiny_llama), "--served-model-name", MODEL, "--block-size", "4",
            "--num-blocks", "512", "--result-cache-bytes", "200000",
            "--api-keys", "ka:alice,kb:bob"]
    with serve(args, tmp_path_factory.mktemp("rc")) as s:
        yield s


def _client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _hit(usage) -> bool:
    return bool((usage.model_extra or {}).get("result_cache_hit"))


def test_a_repeat_is_replayed_with_the_same_content_and_chunks(server):
    alice = _client(server, "ka")
    kw = dict(model=MODEL, prompt="the cache test prompt", max_tokens=12, temperature=0,
              logprobs=2, extra_body={"ignore_eos": True})
    first = alice.completions.create(**kw)
    again = alice.completions.create(**kw)
    assert not _hit(first.usage) and _hit(again.usage)
    assert again.choices[0].text == first.choices[0].text
    assert again.choices[0].logprobs.tokens == first.choices[0].logprobs.tokens
    assert again.usage.completion_tokens == first.usage.completion_tokens == 12

    def chunks():
        return [c.choices[0].text for c in alice.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}) if c.choices]
    streamed, replayed = chunks(), chunks()
    assert streamed == replayed and "".join(streamed) == first.choices[0].text
    assert server.metric("result_cache_hits_total") >= 3


def test_a_changed_parameter_another_tenant_or_an_opt_out_misses(server):
    alice, bob = _client(server, "ka"), _client(server, "kb")
    msgs = [{"role": "user", "content": "cache me"}]
    base = dict(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    alice.chat.completions.create(**base)
    assert _hit(alice.chat.completions.create(**base).usage)
    assert not _hit(alice.chat.completions.create(**{**base, "max_tokens": 7}).usage)
    assert not _hit(alice.chat.completions.create(**base, presence_penalty=0.5).usage)
    assert not _hit(bob.chat.completions.create(**base).usage)
    assert not _hit(alice.chat.completions.create(
        **base, extra_body={"result_cache": False}).usage)
    seeded = {**base, "temperature": 1.0, "seed": 4}
    one = alice.chat.completions.create(**seeded)
    two = alice.chat.completions.create(**seeded)
    assert _hit(two.usage) and two.choices[0].message.content == one.choices[0].message.content
    free = {**base, "temperature": 1.0}
    alice.chat.completions.create(**free)
    assert not _hit(alice.chat.completions.create(**free).usage)  # not deterministic
    text = httpx.get(server.url + "/metrics").text
    assert "kvmesh:result_cache_bytes" in text and "kvmesh:result_cache_misses_total" in text


@pytest.mark.slow
def test_the_default_model_replays_a_structured_answer(tmp_path):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "rank": {"type": "integer"}},
              "required": ["city", "rank"]}
    with serve(["--result-cache-bytes", "1000000"], tmp_path) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        kw = dict(model=client.models.list().data[0].id, max_tokens=60, temperature=0,
                  messages=[{"role": "user", "content": "Your favourite city, as JSON."}],
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "c", "schema": schema}})
        first = client.chat.completions.create(**kw)
        again = client.chat.completions.create(**kw)
        assert not _hit(first.usage) and _hit(again.usage)
        assert again.choices[0].message.content == first.choices[0].message.content
        assert s.metric("result_cache_hits_total") == 1
