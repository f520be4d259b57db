"""Start a real `kvmesh serve` process on loopback for tests, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open until all are chosen: the kernel
    may hand a just-closed port out again)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, host: str = "127.0.0.1"):
        self.proc = proc
        self.host, self.port = host, port
        self.log = log
        self.url = f"http://{host}:{port}"

    def wait(self, path: str = "/ready", timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.log.read_text()[-3000:]}")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(f"kvmesh:{name}") and not line.startswith("#"):
                head = line.split(" ")[0]
                if head == f"kvmesh:{name}" or head.startswith(f"kvmesh:{name}{{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def serve(args: list[str], tmp: Path, wait: str | None = "/ready", pin_float32: bool = True,
          command: str = "serve", port: int | None = None, host: str | None = None,
          prefix: tuple[str, ...] = ()):
    """A `kvmesh serve` (or `command`) subprocess on a free loopback port (or `host`, run
    under `prefix`, such as `ip netns exec NS`). With `pin_float32` (tests) serve's dtype is
    float32 unless `args` name one: the exact path on every CPU."""
    port = port or free_port()
    log = tmp / f"{command}-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if command == "serve" and pin_float32 and "--dtype" not in args:  # auto: bf16 on some CPUs
        args = [*args, "--dtype", "float32"]
    cmd = [*prefix, sys.executable, "-m", "kvmesh.cli", command, "--port", str(port), *args]
    if host is not None:
        cmd += ["--host", host]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log, host or "127.0.0.1")
    try:
        if wait:
            server.wait(wait)
        yield server
    finally:
        server.stop()
