"""The mesh between real `kvmesh serve` processes on loopback: gossip discovery, peer
fetches with identical greedy output, a dead or stalled holder, and a wrong secret."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server_process import free_ports, serve

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
         "kappa", "lambda", "mu"]


def long_prompt(n_words: int, seed: int = 0) -> str:
    return "Read these notes. " + " ".join(WORDS[(i * 7 + seed) % len(WORDS)]
                                            for i in range(n_words))


def _secret(tmp: Path, name: str = "secret", value: str = "s3cret-for-the-test-mesh") -> str:
    path = tmp / name
    path.write_text(value)
    return str(path)


def _mesh_args(port: int, secret: str, seeds: list[int], extra: list[str]) -> list[str]:
    args = ["--p2p-port", str(port), "--cluster-secret-file", secret, *extra]
    if seeds:
        args += ["--peers", ",".join(f"127.0.0.1:{p}" for p in seeds)]
    return args


def _complete(url: str, prompt: str, max_tokens: int = 12) -> tuple[str, int]:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def _wait_for(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _peer_metric(url: str, name: str) -> float:
    """`kvmesh:<name>` summed over the series labelled tier="peer"."""
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(f"kvmesh:{name}{{") and 'tier="peer"' in line)


def _view(url: str) -> dict:
    return httpx.get(url + "/mesh", timeout=10).json()


def _holder(url: str, node_id: str, at_least: int = 1) -> bool:
    """`url`'s directory lists `at_least` blocks of `node_id`, over a live link."""
    return any(m["node_id"] == node_id and m["linked"] and m["blocks"] >= at_least
               for m in _view(url)["members"])


@contextlib.contextmanager
def _mesh(tmp: Path, model_args: list[str], n: int = 3, chain: bool = True):
    """n instances; each seeds only the previous one (the rest comes from gossip)."""
    secret = _secret(tmp)
    all_ports = free_ports(2 * n)  # P2P and HTTP, all distinct
    ports, http_ports = all_ports[:n], all_ports[n:]
    with contextlib.ExitStack() as stack:
        servers = []
        for i, port in enumerate(ports):
            seeds = ports[i - 1:i] if chain and i else []
            servers.append(stack.enter_context(
                serve(_mesh_args(port, secret, seeds, model_args), tmp, port=http_ports[i])))
        ids = [_view(s.url)["me"]["node_id"] for s in servers]
        for s in servers:  # gossip: everyone learns of everyone, though seeded with one
            _wait_for(lambda s=s: sum(m["linked"] for m in _view(s.url)["members"]) == n - 1,
                      f"{s.url} linked to every member")
        yield servers, ids, ports, secret


@pytest.mark.timeout(300)
def test_peer_fetch_gives_identical_output_and_gossip_discovery(tmp_path, tiny_llama):
    args = ["--model", str(tiny_llama), "--block-size", "4"]
    prompt = long_prompt(80)
    with _mesh(tmp_path, args) as (servers, ids, _, _):
        a, b, c = servers
        cold_text, cached = _complete(a.url, prompt)
        assert cached == 0
        _wait_for(lambda: _holder(b.url, ids[0]), "B's directory to list A's blocks")
        text, cached = _complete(b.url, prompt)
        assert text == cold_text
        assert cached > 0  # served from A's blocks
        assert _peer_metric(b.url, "kv_tier_hit_tokens_total") >= cached - 4
        assert _view(b.url)["stats"]["blocks_in"] > 0
        assert _view(a.url)["stats"]["blocks_out"] > 0
        assert b.metric("mesh_blocks_in_total") == _view(b.url)["stats"]["blocks_in"] > 0
        assert b.metric("mesh_members") == 2
        # C (seeded with B only) found A through gossip, and A's blocks through B's too.
        text_c, cached_c = _complete(c.url, prompt)
        assert text_c == cold_text and cached_c > 0
        # `kvmesh peers` prints C's view: A and B, alive, A holding blocks.
        out = subprocess.run([sys.executable, "-m", "kvmesh.cli", "peers", "--url", c.url],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "COLUMNS": "200"})
        assert out.returncode == 0, out.stderr
        rows = [line for line in out.stdout.splitlines() if ids[0][:8] in line
                or ids[1][:8] in line]
        assert len(rows) == 2 and all("alive" in row for row in rows), out.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_dead_or_stalled_holder_turns_into_a_recompute(tmp_path, tiny_llama, sig):
    args = ["--model", str(tiny_llama), "--block-size", "4"]
    prompt = long_prompt(80, seed=3)
    with _mesh(tmp_path, args, n=2) as (servers, ids, _, _):
        a, b = servers
        cold_text, _ = _complete(a.url, prompt)
        _wait_for(lambda: _holder(b.url, ids[0]), "B's directory to list A's blocks")
        a.proc.send_signal(sig)
        try:
            start = time.monotonic()
            text, _ = _complete(b.url, prompt)
            took = time.monotonic() - start
        finally:
            if sig == signal.SIGSTOP:
                a.proc.send_signal(signal.SIGCONT)
        assert text == cold_text
        assert took < 30  # within the fetch timeout and a recompute, never a hang
        if sig == signal.SIGKILL:
            _wait_for(lambda: not _view(b.url)["members"], "B to bury A")


@pytest.mark.timeout(300)
def test_graceful_leave_keeps_a_prefix_a_peer_hit(tmp_path, tiny_llama):
    """A prefix computed on A, then A stopped with SIGTERM: A hands its blocks to B and C
    as it leaves, and C still serves the prompt from cache (its own share and B's, the
    latter fetched as a peer hit), token for token as A's cold run. In bfloat16: blocks
    of any dtype go over the wire as bytes."""
    args = ["--model", str(tiny_llama), "--block-size", "4", "--dtype", "bfloat16"]
    prompt = long_prompt(80, seed=11)
    with _mesh(tmp_path, args) as (servers, ids, _, _):
        a, b, c = servers
        r = httpx.post(a.url + "/v1/completions", timeout=120, json={
            "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        cold_text = r.json()["choices"][0]["text"]
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
        full_blocks = prompt_tokens // 4
        _wait_for(lambda: _holder(c.url, ids[0], full_blocks), "C to list A's blocks")
        assert a.stop(signal.SIGTERM) == 0
        _wait_for(lambda: all(m["node_id"] != ids[0] for m in _view(c.url)["members"]),
                  "C to see A leave")
        adopted = [_view(s.url)["stats"]["blocks_adopted"] for s in (b, c)]
        assert sum(adopted) >= full_blocks and min(adopted) > 0  # spread over both
        _wait_for(lambda: _holder(c.url, ids[1], adopted[0]), "C to list B's new blocks")
        text, cached = _complete(c.url, prompt)
        assert text == cold_text
        assert cached >= prompt_tokens - 4  # every full block, from C's host or from B
        assert _peer_metric(c.url, "kv_tier_hit_tokens_total") > 0


@pytest.mark.timeout(240)
def test_a_wrong_secret_is_refused_and_learns_nothing(tmp_path, tiny_llama):
    args = ["--model", str(tiny_llama), "--block-size", "4"]
    with _mesh(tmp_path, args, n=2) as (servers, _, ports, _):
        a, _ = servers
        _complete(a.url, long_prompt(60))
        bad = _secret(tmp_path, "other", "another-secret-entirely-123")
        p2p_port, http_port = free_ports(2)
        with serve(_mesh_args(p2p_port, bad, [ports[0]], args), tmp_path,
                   port=http_port) as intruder:
            _wait_for(lambda: _view(intruder.url)["stats"]["handshakes_refused"] >= 1,
                      "the intruder to fail the handshake")
            view = _view(intruder.url)
            assert view["members"] == []  # no membership list
            assert view["stats"]["blocks_in"] == 0
            assert intruder.metric("mesh_handshakes_refused_total") >= 1
            assert intruder.metric("mesh_members") == 0
            assert len(_view(a.url)["members"]) == 1  # the intruder never joined


@pytest.mark.timeout(600)
def test_default_model_2k_prompt_is_a_peer_hit_with_identical_output(tmp_path):
    """Three instances of the default model: a 2,000+ token prompt computed on A is served
    on B and C from A's blocks, token for token as A's cold run."""
    prompt = long_prompt(1900, seed=5)
    with _mesh(tmp_path, ["--block-size", "16"]) as (servers, ids, _, _):
        a, b, c = servers
        r = httpx.post(a.url + "/v1/completions", timeout=300, json={
            "prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] >= 2000
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        cold_text = r.json()["choices"][0]["text"]
        full_blocks = usage["prompt_tokens"] // 16
        for s in (b, c):  # the batches reach every member asynchronously
            _wait_for(lambda s=s: _holder(s.url, ids[0], full_blocks),
                      f"{s.url}'s directory to list all of A's blocks")
        for s in (b, c):
            text, cached = _complete(s.url, prompt, max_tokens=16)
            assert text == cold_text
            assert cached >= usage["prompt_tokens"] - 64  # all but the last partial blocks
            assert _peer_metric(s.url, "kv_tier_hit_tokens_total") >= cached - 64
