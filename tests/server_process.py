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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

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
          command: str = "serve", port: int | None = None):
    """A `kvmesh serve` (or `command`) subprocess on a free loopback port. With
    `pin_float32` (tests) serve's dtype is float32 unless `args` name one: the exact path on
    every CPU."""
    port = port or free_port()
    log = tmp / f"{command}-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if command == "serve" and pin_float32 and "--dtype" not in args:  # auto: bf16 on some CPUs
        args = [*args, "--dtype", "float32"]
    cmd = [sys.executable, "-m", "kvmesh.cli", command, "--port", str(port), *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log)
    try:
        if wait:
            server.wait(wait)
        yield server
    finally:
        server.stop()
