"""A real server process on loopback, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from tests.server_process import serve

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = ["--model", str(tiny_llama), "--served-model-name", MODEL, "--block-size", "4",
            "--num-blocks", "512", "--max-num-seqs", "8"]
    with serve(args, tmp_path_factory.mktemp("srv")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_models_health_ready(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


def test_completions_sync_and_stream_agree(client):
    kw = dict(model=MODEL, prompt="The quick brown fox jumps over the lazy dog. " * 3,
              max_tokens=12, temperature=0)
    whole = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    chunks = list(client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # same prompt again


def test_chat_sync_and_async_stream(client, server):
    msgs = [{"role": "user", "content": "Say something about the lazy dog."}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                           temperature=0)
    assert whole.choices[0].message.role == "assistant"

    async def stream() -> str:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        s = await ac.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                             temperature=0, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in s]
        await ac.close()
        return "".join(parts)

    async def whole_async() -> str:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        r = await ac.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                             temperature=0)
        await ac.close()
        return r.choices[0].message.content

    streamed, async_whole = asyncio.run(stream()), asyncio.run(whole_async())
    assert streamed == whole.choices[0].message.content == async_whole


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    parsed = [json.loads(e[6:]) for e in events[:-1]]
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["completion_tokens"] == 3
    assert all(p["object"] == "text_completion" for p in parsed)
    body["stream_options"] = {"include_usage": False}  # no usage chunk...
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        plain = [e for e in "".join(r.iter_text()).split("\n\n") if e]
    assert all(e.startswith("data: ") for e in plain)  # ...and nothing else either
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"X-Kvmesh-Usage": "1"}) as r:  # as a router asks: a comment
        events = [e for e in "".join(r.iter_text()).split("\n\n") if e]
    assert [e[:8] for e in events[-2:]] == [": usage ", "data: [D"]
    usage = json.loads(events[-2][len(": usage "):])
    assert usage["completion_tokens"] == 3 and usage["prompt_tokens"] > 0
    assert all(e.startswith("data: {") for e in events[:-2])


def test_n_and_logprobs_and_batch_prompts(client):
    r = client.completions.create(model=MODEL, prompt=["a b c", "d e f"], n=2, max_tokens=4,
                                  temperature=1.0, seed=3, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == 4 for c in r.choices)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=3, logprobs=True, top_logprobs=2,
                                          temperature=0, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


@pytest.mark.parametrize("body,fragment", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x " * 600, "max_tokens": 4}, "max_model_len"),
    ({"prompt": "x", "max_tokens": 100000}, "max_model_len"),
    ({"prompt": [10**7]}, "vocabulary"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
])
def test_bad_parameters_get_400_naming_the_problem(server, body, fragment):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_model(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]


def test_client_disconnect_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "the lazy dog " * 20, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    for _ in range(100):
        if server.metric("num_requests_running") == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert server.metric("num_requests_running") == 0
    assert server.metric("kv_cache_usage_perc") == 0.0
    assert server.metric("request_success_total") >= 1
    aborted = [line for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line.startswith("kvmesh:request_success_total{")
               and 'finished_reason="abort"' in line]
    assert aborted and float(aborted[0].rsplit(" ", 1)[1]) >= 1  # the abort is counted


def test_metrics_names(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ["time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens",
                 "generation_tokens"]:
        assert f"kvmesh:{name}" in text, name
    assert server.metric("prefix_cache_hits_total") > 0


def test_idle_keep_alive_connection_outlives_the_clients_pools(server):
    """The server keeps an idle connection longer than httpx (5 s) and aiohttp (15 s)
    clients keep theirs, so a client reusing one never races the server's close: two
    requests on one socket, 6 s apart, both answered."""
    request = f"GET /health HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        for pause in (0.0, 6.0):
            time.sleep(pause)
            sock.sendall(request)
            reply = b""
            while b'"ok"' not in reply:
                chunk = sock.recv(4096)
                assert chunk, f"the server closed the connection after {pause} s idle"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
