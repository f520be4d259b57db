"""Tenants on an instance (real server processes): keys, rate limits, cache salts, KV events
and snapshots, and admission control's 429 with Retry-After."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import msgspec
import pytest
import zmq
import zmq.utils.monitor

from kvmesh.engine.kv_events import BlocksStored, KVEventBatch, KVSnapshot
from tests.server_process import free_port, serve

TENANTS = """
tenants:
  a:
    api_keys: [key-a]
    requests_per_min: 1000
  b:
    api_keys: [key-b]
    requests_per_min: 3
  shared-1:
    api_keys: [key-s1]
    cache_salt: team
  shared-2:
    api_keys: [key-s2]
    cache_salt: team
  strict:
    api_keys: [key-t]
    ttft_slo_s: 0.000001
"""
PROMPT = "The quick brown fox jumps over the lazy dog, again and again. " * 3


def _post(url: str, key: str | None, timeout_s: float = 60, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, **body}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=timeout_s)


def _cached(resp: httpx.Response) -> int:
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.timeout(240)
def test_tenant_keys_limits_salts_and_kv_events(tmp_path, tiny_llama):
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    port = free_port()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sub.connect(f"tcp://127.0.0.1:{port}")
    args = ["--model", str(tiny_llama), "--tenants", str(path), "--kv-events-port", str(port),
            "--block-size", "4", "--num-blocks", "256"]
    try:
        with serve(args, tmp_path) as s:
            _wait_subscribed(monitor)
            assert _post(s.url, None).status_code == 401
            assert _post(s.url, "nope").status_code == 401
            assert _cached(_post(s.url, "key-a")) == 0
            assert _cached(_post(s.url, "key-a")) > 0  # a's own cache
            assert _cached(_post(s.url, "key-b")) == 0  # b cannot reach a's blocks
            assert _cached(_post(s.url, "key-s1")) == 0
            assert _cached(_post(s.url, "key-s2")) > 0  # same cache_salt: shared on purpose
            codes = [_post(s.url, "key-b").status_code for _ in range(3)]
            assert codes[:2] == [200, 200] and codes[2] == 429  # 3 per minute
            limited = _post(s.url, "key-b")
            assert int(limited.headers["retry-after"]) >= 1
            assert limited.json()["error"]["type"] == "rate_limit_exceeded"
            assert _metric(s, "tenant_rejected_total", 'tenant="b"', 'reason="rate_limit"') == 2
            assert _metric(s, "tenant_requests_total", 'tenant="a"') == 2
            assert _metric(s, "tenant_slo_met_total", 'tenant="a"', 'slo="all"') == 2  # no SLO
            assert _post(s.url, "key-t").status_code == 200  # a TTFT SLO nothing can meet
            assert _metric(s, "tenant_requests_total", 'tenant="strict"') == 1
            assert _metric(s, "tenant_slo_met_total", 'tenant="strict"', 'slo="ttft"') == 0
            assert _metric(s, "tenant_slo_met_total", 'tenant="strict"', 'slo="tpot"') == 1
            assert _metric(s, "tenant_slo_met_total", 'tenant="strict"', 'slo="all"') == 0
            _leave_early(s.url, "key-a")  # a request whose client leaves meets no SLO
            _wait_metric(s, 3, "tenant_requests_total", 'tenant="a"')
            assert _metric(s, "tenant_slo_met_total", 'tenant="a"', 'slo="all"') == 2
            assert _metric(s, "request_success_total", 'finished_reason="abort"') == 1
            for path in ("/load", "/kv/snapshot"):  # what it caches is behind the keys
                assert httpx.get(s.url + path).status_code == 401
            key_a = {"Authorization": "Bearer key-a"}
            load = httpx.get(s.url + "/load", headers=key_a).json()
            assert load["kv_events_port"] == port and load["block_size"] == 4
            assert load["num_prefill_tokens"] == 0  # idle: nothing queued to prefill
            snap = msgspec.msgpack.decode(httpx.get(s.url + "/kv/snapshot",
                                                    headers=key_a).content,
                                          type=KVSnapshot)
            assert snap.instance_id == load["instance_id"] and snap.seq >= 1
            assert len(snap.media["device"]) > 0
            batches = _received(sub)
            assert [b.seq for b in batches] == sorted(b.seq for b in batches)
            stored = {k for b in batches for e in b.events if isinstance(e, BlocksStored)
                      for k in e.keys}
            assert set(snap.media["device"]) <= stored  # every held block was announced
    finally:
        sub.disable_monitor()
        monitor.close(linger=0)
        sub.close(linger=0)
        ctx.term()


METERED = """
tenants:
  m:
    api_keys: [key-m]
    tokens_per_min: 300
"""


@pytest.mark.timeout(120)
def test_output_without_max_tokens_counts_against_the_token_budget(tmp_path, tiny_llama):
    """A request that sets no max_tokens is charged its prompt up front, not the rest of
    the context (which may be more than a minute's budget), and its output when it ends:
    leaving the cap out neither gets it refused nor lets it slip past tokens_per_min."""
    path = tmp_path / "tenants.yaml"
    path.write_text(METERED)
    args = ["--model", str(tiny_llama), "--tenants", str(path), "--max-model-len", "400"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    with serve(args, tmp_path) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json=chat,
                       headers={"Authorization": "Bearer key-m"}, timeout=60)
        assert r.status_code == 200, r.text  # the whole context is more than 300
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 400  # to the end
        # 300 - 400 left, plus 5/s of refill: even a one-token request waits. Without
        # settling the output, 300 minus the prompt would be left.
        refused = _post(s.url, "key-m", prompt="hi", max_tokens=1)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        too_big = _post(s.url, "key-m", prompt="hi", max_tokens=350)  # a cap over 300
        assert too_big.status_code == 400 and "tokens_per_min" in too_big.text, too_big.text


def _leave_early(url: str, key: str) -> None:
    """A streamed request whose client closes the connection as soon as the response
    starts, long before its last token."""
    body = {"prompt": PROMPT, "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200


def _wait_metric(server, value: float, name: str, *labels: str) -> None:
    deadline = time.monotonic() + 30
    while _metric(server, name, *labels) != value:
        assert time.monotonic() < deadline, f"{name} {labels} never reached {value}"
        time.sleep(0.1)


def _wait_subscribed(monitor: zmq.Socket) -> None:
    """PUB drops what it sends before a subscriber's subscription reaches it (ZeroMQ's slow
    joiner): wait for the handshake, then give the subscription time to arrive."""
    assert monitor.poll(timeout=30_000), "the subscriber never connected to the publisher"
    event = zmq.utils.monitor.recv_monitor_message(monitor)
    assert event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    time.sleep(0.5)


def _metric(server, name: str, *labels: str) -> float:
    """Sum of `kvmesh:<name>` samples whose labels include every one given."""
    total = 0.0
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f"kvmesh:{name}") and all(lab in line for lab in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _received(sub: zmq.Socket) -> list[KVEventBatch]:
    out = []
    while sub.poll(timeout=500):
        out.append(msgspec.msgpack.decode(sub.recv(), type=KVEventBatch))
    return out


ADMISSION = """
tenants:
  chat:
    api_keys: [k-chat]
    ttft_slo_s: 0.05
  batch:
    api_keys: [k-batch]
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_admission_refuses_what_the_queue_would_make_late(tmp_path):
    """Default model, fcfs: with long batch prompts queued, a request whose tenant's TTFT
    SLO the queue would break is refused at once with 429 and Retry-After; the batch
    requests all complete."""
    path = tmp_path / "tenants.yaml"
    path.write_text(ADMISSION)
    long = "Summarize the following notes carefully. " + "note alpha beta gamma. " * 150
    args = ["--tenants", str(path), "--max-num-seqs", "1", "--num-threads", "1"]
    with serve(args, tmp_path) as s:
        assert _post(s.url, "k-batch", prompt=long).status_code == 200  # measures prefill
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            # Distinct from the first token on: no cached prefix shortens what is ahead.
            # They queue one behind another on one thread: on a slow CPU (float32, AVX2
            # only) the last one takes over a minute.
            batch = [pool.submit(_post, s.url, "k-batch", prompt=f"Batch {i}. {long}",
                                 max_tokens=4, timeout_s=240) for i in range(4)]
            time.sleep(0.3)
            start = time.monotonic()
            refused = _post(s.url, "k-chat", prompt="hi")
            num_done = sum(f.done() for f in batch)
            codes = [f.result().status_code for f in batch]
            batch_s = time.monotonic() - start
        assert refused.status_code == 429, refused.text
        assert "TTFT SLO" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # Refused at the next step boundary, not after waiting its turn in the queue (a
        # step can take seconds on a slow CPU, so no fixed time bound).
        assert num_done <= 1, (num_done, batch_s)
        assert codes == [200] * 4
        assert _post(s.url, "k-chat", prompt="hi").status_code == 200  # idle again: admitted
        assert _metric(s, "tenant_rejected_total", 'tenant="chat"', 'reason="slo"') == 1
        assert _metric(s, "tenant_requests_total", 'tenant="batch"') == 5
