"""The real router in front of real instances, in separate processes on loopback, driven by
the real `openai` client: KV-aware routing, prefix routing without KV events, failover,
a broken stream, tenants and bad input."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import socket
import socketserver
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_process import Server, free_ports, serve

DOC = " ".join(f"item{i} is filed under shelf {i % 7}." for i in range(180))
SHORT = DOC[:300]  # the tiny model's context is 512 tokens


def _router(tmp: Path, instances: list[Server], *args: str):
    return _router_at(tmp, [s.url for s in instances], *args)


def _router_at(tmp: Path, urls: list[str], *args: str):
    return serve(["--instances", ",".join(urls), "--poll-interval-s", "0.2", *args], tmp,
                 wait="/health", command="router")


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, question: str, **kw):
    return client.chat.completions.create(
        model=kw.pop("model", ""), temperature=0, max_tokens=kw.pop("max_tokens", 12),
        messages=[{"role": "system", "content": kw.pop("doc", SHORT)},
                  {"role": "user", "content": question}],
        **kw)


def _served_by(instances: list[Server]) -> list[float]:
    return [s.metric("request_success_total") for s in instances]


def _wait(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _answers(url: str) -> bool:
    """Whether a server listens at `url` (any status)."""
    try:
        httpx.get(url, timeout=2.0)
    except httpx.TransportError:
        return False
    return True


def _router_gauge(router: Server, name: str, instance: str) -> float:
    for line in httpx.get(router.url + "/metrics").text.splitlines():
        if line.startswith(name) and f'instance="{instance}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kv_policy_with_the_default_model(tmp_path):
    """Three default-model instances. A long prefix computed directly on the third (the
    router never saw that request) reaches the router through KV events; requests with
    that prefix then go there, not to the first instance that ties would pick, are
    counted as cached there, and give the output of a cold run elsewhere."""
    ports = free_ports(6)  # HTTP and KV events for three instances, all distinct
    with contextlib.ExitStack() as stack:
        insts = [stack.enter_context(serve(["--kv-events-port", str(ports[3 + i]),
                                            "--num-threads", "1"], tmp_path, port=ports[i]))
                 for i in range(3)]
        router = stack.enter_context(_router(tmp_path, insts, "--policy", "kv"))
        client = _client(router.url)
        name = client.models.list().data[0].id
        warm = _ask(_client(insts[2].url), "Which shelf holds item5?", model=name, doc=DOC)
        _wait(lambda: _router_gauge(router, "kvmesh_router_kv_index_blocks",
                                    insts[2].url) > 100)
        again = [_ask(client, f"Which shelf holds item{i}?", model=name, doc=DOC)
                 for i in (6, 7)]
        assert _served_by(insts) == [0.0, 0.0, 3.0]
        for r in again:
            assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 32
        direct = _ask(_client(insts[0].url), "Which shelf holds item6?", model=name, doc=DOC)
        assert direct.usage.prompt_tokens_details.cached_tokens == 0
        assert direct.choices[0].message.content == again[0].choices[0].message.content
        # streaming passes through chunk by chunk, with usage
        chunks = list(_ask(client, "Which shelf holds item5?", model=name, doc=DOC, stream=True,
                           stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == warm.choices[0].message.content
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
        assert _served_by(insts) == [1.0, 0.0, 4.0]


@pytest.fixture
def tiny_pair(tmp_path, tiny_llama):
    args = ["--model", str(tiny_llama), "--num-blocks", "256"]
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serve(args, tmp_path)) for _ in range(2)], args


@pytest.mark.timeout(240)
def test_prefix_policy_needs_no_kv_events(tmp_path, tiny_pair):
    """No KV events (the stand-in for another engine): the router's own record sends a
    repeated prompt back to where it went, even with a stream in flight there that
    would make least_load (or an empty index) choose the other instance."""
    insts, _ = tiny_pair
    with _router(tmp_path, insts, "--policy", "prefix", "--load-cost-tokens", "10") as router:
        client = _client(router.url)
        assert _ask(client, "question 0").usage.prompt_tokens_details.cached_tokens == 0
        assert _served_by(insts) == [1.0, 0.0]
        # in flight on instance 0, sent there directly: through the router, a load probe
        # taken while question 0 still ran could send it to instance 1 instead
        busy = _client(insts[0].url).completions.create(
            model="", prompt="other text " * 10, stream=True, max_tokens=400,
            extra_body={"ignore_eos": True})
        next(iter(busy))
        time.sleep(0.6)  # probes (every 0.2 s) see it decoding, no prefill left queued
        again = _ask(client, "question 1")
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        busy.close()
        served = _served_by(insts)
        assert served[0] >= 2 and served[1] == 0  # (the busy stream may have finished)
        # an instance's own 400 passes through unchanged, and costs it nothing
        with pytest.raises(openai.BadRequestError, match="max_model_len"):
            client.completions.create(model="", prompt="x " * 600, max_tokens=4)
        assert len(httpx.get(router.url + "/health").json()["healthy"]) == 2


@pytest.mark.timeout(240)
def test_the_router_finds_the_mesh_members_it_was_not_given(tmp_path, tiny_llama):
    """--discover-mesh: given one instance, the router reads its /mesh and routes to the
    other member too."""
    secret = tmp_path / "secret"
    secret.write_text("a-secret-for-the-router-test")
    p2p = free_ports(2)
    base = ["--model", str(tiny_llama), "--num-blocks", "256", "--cluster-secret-file",
            str(secret)]
    with serve([*base, "--p2p-port", str(p2p[0])], tmp_path) as a, \
            serve([*base, "--p2p-port", str(p2p[1]), "--peers", f"127.0.0.1:{p2p[0]}"],
                  tmp_path) as b:
        _wait(lambda: len(httpx.get(a.url + "/mesh").json()["members"]) >= 1, 30)
        with _router(tmp_path, [a], "--policy", "round_robin", "--discover-mesh",
                     "--discover-interval-s", "0.3") as router:
            _wait(lambda: sorted(httpx.get(router.url + "/health").json()["healthy"])
                  == sorted([a.url, b.url]), 30)
            client = _client(router.url)
            for q in range(4):
                assert _ask(client, f"q{q}").choices[0].finish_reason in ("stop", "length")
            assert min(_served_by([a, b])) >= 1  # both took requests


@pytest.mark.timeout(240)
def test_failover_before_the_first_byte_and_readmission(tmp_path, tiny_pair):
    insts, args = tiny_pair
    with _router(tmp_path, insts, "--policy", "round_robin") as router:
        client = _client(router.url)
        insts[0].stop(signal.SIGKILL)
        # the router has not noticed yet: every request still succeeds, on the survivor
        for q in range(4):
            assert _ask(client, f"q{q}").choices[0].finish_reason in ("stop", "length")
        health = httpx.get(router.url + "/health").json()
        assert health["healthy"] == [insts[1].url]
        with serve(args, tmp_path, port=insts[0].port) as back:
            _wait(lambda: back.url in httpx.get(router.url + "/health").json()["healthy"])
            for q in range(4):
                _ask(client, f"again {q}")
            assert back.metric("request_success_total") >= 1
        insts[1].stop(signal.SIGKILL)
        _wait(lambda: httpx.get(router.url + "/health").status_code == 503)
        err = httpx.post(router.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
        assert err.status_code == 503 and err.headers["retry-after"] == "1"


@pytest.mark.timeout(240)
def test_instances_with_api_keys_answer_the_routers_probes_only_with_its_key(tmp_path,
                                                                           tiny_llama):
    args = ["--model", str(tiny_llama), "--num-blocks", "64", "--api-keys", "inst-key"]
    with serve(args, tmp_path) as inst:
        assert httpx.get(inst.url + "/load").status_code == 401
        with serve(["--instances", inst.url, "--poll-interval-s", "0.2"], tmp_path,
                   wait=None, command="router") as keyless:
            _wait(lambda: "--upstream-api-key" in keyless.log.read_text(), 30)
            _wait(lambda: _answers(keyless.url + "/health"), 30)  # it may log before listening
            assert httpx.get(keyless.url + "/health").status_code == 503  # its probes: 401
        with _router(tmp_path, [inst], "--policy", "least_load",
                     "--upstream-api-key", "inst-key") as router:
            assert httpx.get(router.url + "/health").json()["healthy"] == [inst.url]
            # clients' requests pass on with the clients' own keys, not the router's
            assert _client(router.url, "inst-key").completions.create(  # random weights: no EOS
                model="", prompt="hi", max_tokens=2,
                extra_body={"ignore_eos": True}).usage.completion_tokens == 2
            with pytest.raises(openai.AuthenticationError):
                _client(router.url, "wrong").completions.create(model="", prompt="hi",
                                                                max_tokens=2)


@pytest.mark.timeout(240)
def test_instance_dying_mid_stream_ends_with_an_error_event(tmp_path, tiny_llama):
    args = ["--model", str(tiny_llama), "--max-num-seqs", "1"]
    with serve(args, tmp_path) as inst, _router(tmp_path, [inst], "--policy", "least_load") \
            as router:
        stream = _client(router.url).completions.create(
            model="", prompt="count", max_tokens=500, stream=True, temperature=0,
            extra_body={"ignore_eos": True})
        received = 0
        with pytest.raises(openai.APIError, match="instance failed after the first token"):
            for _ in stream:
                received += 1
                if received == 3:
                    inst.stop(signal.SIGKILL)
        assert received >= 3


@pytest.mark.timeout(240)
def test_a_client_that_leaves_mid_stream_ends_its_request_on_the_instance(tmp_path,
                                                                          tiny_llama):
    """Nothing is generated for nobody: the instance aborts the request, and the
    router's lease on the instance ends."""
    args = ["--model", str(tiny_llama), "--max-num-seqs", "1"]
    body = {"prompt": "count", "max_tokens": 480, "stream": True, "temperature": 0,
            "ignore_eos": True}
    with serve(args, tmp_path) as inst, _router(tmp_path, [inst], "--policy", "least_load") \
            as router, httpx.Client(timeout=60) as c:
        with c.stream("POST", router.url + "/v1/completions", json=body) as resp:
            assert any(line.startswith("data: {") for line in resp.iter_lines())
        _wait(lambda: httpx.get(inst.url + "/load").json()["num_running"] == 0)
        assert inst.metric("generation_tokens_total") < 480
        _wait(lambda: _router_gauge(router, "kvmesh_router_in_flight", inst.url) == 0)
        assert _ask(_client(router.url), "still there?").choices  # and it goes on


class _StalledServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    closed: threading.Event


class _RawUpstream(socketserver.StreamRequestHandler):
    """A hand-written HTTP upstream: healthy on GET /health, 404 on other GETs, and
    `post` answers the rest (its request line given, the body still unread)."""

    server: _StalledServer

    def handle(self) -> None:
        line = self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        if line.startswith(b"GET /health"):
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\n{}")
        elif line.startswith(b"GET"):
            self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
        else:
            self.post(line)

    def post(self, line: bytes) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def _raw_upstream(handler: type[_RawUpstream]):
    """`handler` serving on a loopback port: the server (`closed` is set by the handler
    when the router closes its connection) and its URL."""
    with _StalledServer(("127.0.0.1", 0), handler) as upstream:
        upstream.closed = threading.Event()
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        try:
            yield upstream, f"http://127.0.0.1:{upstream.server_address[1]}"
        finally:
            upstream.shutdown()


class _Stalled(_RawUpstream):
    """An upstream that is healthy but stalls every request: a completion before its
    first byte, a chat completion after its first SSE event. It notes when the router
    closes a stalled connection."""

    def post(self, line: bytes) -> None:
        if line.startswith(b"POST /v1/chat/completions"):
            event = b'data: {"choices": []}\n\n'
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n"
                             b"%x\r\n%s\r\n" % (len(event), event))
        while self.rfile.read1(65536):  # the body, then nothing until the router closes
            pass
        self.server.closed.set()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_leaves_a_stalled_instance_frees_it(tmp_path, path):
    """Before the first byte (a queued request) or between chunks (a stalled stream):
    the router closes the instance's connection at once, and its lease ends."""
    with _raw_upstream(_Stalled) as (upstream, url), contextlib.ExitStack() as stop:
        router = stop.enter_context(_router_at(tmp_path, [url], "--policy", "round_robin"))
        payload = json.dumps({"prompt": "hi", "max_tokens": 4}).encode()
        with socket.create_connection(("127.0.0.1", router.port)) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: r\r\n" % path.encode()
                         + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            if "chat" in path:  # the first event reached this client
                sock.settimeout(10)
                seen = b""
                while b"choices" not in seen:  # headers and event may come apart
                    chunk = sock.recv(4096)
                    assert chunk, f"stream closed before its first event: {seen!r}"
                    seen += chunk
            _wait(lambda: _router_gauge(router, "kvmesh_router_in_flight", url) == 1)
            assert not upstream.closed.is_set()
        assert upstream.closed.wait(5), "the router kept the instance busy for nobody"
        _wait(lambda: _router_gauge(router, "kvmesh_router_in_flight", url) == 0)


class _Flooding(_RawUpstream):
    """An upstream that streams SSE events without end, as fast as it is read; it notes
    when the router closes the connection."""

    def post(self, line: bytes) -> None:
        event = b'data: {"choices": [{"text": "%s"}]}\n\n' % (b"x" * 65000)
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(10_000):  # 650 MB at most: far beyond every buffer on the way
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        except OSError:
            self.server.closed.set()


@pytest.mark.timeout(120)
def test_a_client_that_stops_reading_is_dropped_and_frees_the_instance(tmp_path):
    """Connected, but reading nothing: once the buffers on the way are full the router's
    send waits, and after --client-stall-timeout-s the router drops the client, closes the
    instance's connection and ends its lease."""
    with _raw_upstream(_Flooding) as (upstream, url), contextlib.ExitStack() as stop:
        router = stop.enter_context(_router_at(tmp_path, [url], "--policy", "round_robin",
                                               "--client-stall-timeout-s", "3"))
        payload = json.dumps({"prompt": "hi", "stream": True}).encode()
        sock = stop.enter_context(socket.socket())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", router.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\n"
                     + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        _wait(lambda: _router_gauge(router, "kvmesh_router_in_flight", url) == 1)
        assert upstream.closed.wait(30), "the router kept the instance busy for nobody"
        _wait(lambda: _router_gauge(router, "kvmesh_router_in_flight", url) == 0)
        sock.settimeout(10)
        while sock.recv(1 << 20):  # what the buffers held, then the end: dropped
            pass
        assert httpx.get(router.url + "/health").status_code == 200


TENANTS = """
tenants:
  capped:
    api_keys: [k-capped]
    requests_per_min: 2
  other:
    api_keys: [k-other]
  metered:
    api_keys: [k-metered]
    tokens_per_min: 400
"""


@pytest.mark.timeout(240)
def test_router_tenants_and_bad_input(tmp_path, tiny_pair):
    insts, _ = tiny_pair
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    with _router(tmp_path, insts, "--policy", "least_load", "--tenants", str(path)) as router:
        url = router.url + "/v1/completions"
        body = {"prompt": "hello", "max_tokens": 2}
        assert httpx.post(url, json=body).status_code == 401
        bad = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        key = {"Authorization": "Bearer k-capped"}
        bad_json = httpx.post(url, content=b"{nope", headers=key)
        assert bad_json.status_code == 400 and "not valid JSON" in bad_json.text
        # instances read no tenants file here: the router's limits are what is tested
        assert [httpx.post(url, json=body, headers=key).status_code for _ in range(2)] == [
            200, 200]
        limited = httpx.post(url, json=body, headers=key)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        other = httpx.post(url, json=body, headers={"Authorization": "Bearer k-other"})
        assert other.status_code == 200
        # The router charges an estimate up front (the prompt + 256 tokens when max_tokens
        # is unset) and settles with the answer's usage (16 tokens made here): without the
        # settling, 400 tokens a minute would admit one such request, not four.
        metered = {"Authorization": "Bearer k-metered"}
        plain = {"prompt": "hello"}
        assert httpx.post(url, json=plain, headers=metered).json()["usage"]["total_tokens"] < 40
        for options in ({}, {"stream_options": {"include_usage": True}}, {}):
            with httpx.stream("POST", url, json=plain | {"stream": True} | options,
                              headers=metered) as r:
                assert r.status_code == 200 and "[DONE]" in "".join(r.iter_text())
        # an answer the instance refuses (400) used nothing: its charge comes back too
        refused = httpx.post(url, json=plain | {"temperature": -1}, headers=metered)
        assert refused.status_code == 400 and "temperature" in refused.text
        assert httpx.post(url, json=plain, headers=metered).status_code == 200
        models = httpx.get(router.url + "/v1/models", headers=key)
        assert models.status_code == 200 and models.json()["data"]


@pytest.mark.timeout(240)
def test_instance_killed_under_load(tmp_path, tiny_llama):
    """Six concurrent streams over two instances that run one sequence at a time; one
    instance is killed mid-run. Its queued requests (no first token yet) are retried on
    the survivor and complete; at most its one running stream ends with a clean error;
    nothing hangs, and the router drops the dead instance, then readmits it when it
    comes back."""
    args = ["--model", str(tiny_llama), "--max-num-seqs", "1"]
    with contextlib.ExitStack() as stack:
        insts = [stack.enter_context(serve(args, tmp_path)) for _ in range(2)]
        router = stack.enter_context(_router(tmp_path, insts, "--policy", "round_robin"))
        client = _client(router.url)
        started = threading.Event()

        def one(i: int) -> str:
            stream = client.completions.create(
                model="", prompt=f"stream {i}", max_tokens=400, stream=True, temperature=0,
                extra_body={"ignore_eos": True})
            n = 0
            try:
                for chunk in stream:
                    n += len(chunk.choices[0].text) > 0 if chunk.choices else 0
                    if n == 5:
                        started.set()
            except openai.APIError as exc:
                assert "instance failed after the first token" in str(exc)
                return "error"
            return "ok"

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, i) for i in range(6)]
            assert started.wait(60)
            insts[0].stop(signal.SIGKILL)
            outcomes = [f.result(timeout=120) for f in futures]
        assert outcomes.count("error") <= 1 and outcomes.count("ok") >= 5, outcomes
        assert httpx.get(router.url + "/health").json()["healthy"] == [insts[1].url]
        metrics = httpx.get(router.url + "/metrics").text
        retries = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("kvmesh_router_retries_total"))
        assert retries >= 2  # the killed instance's queued requests moved
        # it comes back on its port: the router readmits it and sends it work again
        back = stack.enter_context(serve(args, tmp_path, port=insts[0].port))
        _wait(lambda: back.url in httpx.get(router.url + "/health").json()["healthy"], 60)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert all(r.choices for r in pool.map(
                lambda q: _ask(client, f"after {q}", max_tokens=4), range(4)))
        assert back.metric("request_success_total") >= 1
