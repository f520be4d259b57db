"""Schemathesis fuzzes the served OpenAPI schema: no 5xx, no schema or status violations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.server_process import serve

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,negative_data_rejection")


def test_schemathesis_finds_nothing(tiny_llama, tmp_path):
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    with serve(["--model", str(tiny_llama), "--block-size", "4"], tmp_path) as s:
        cmd = [exe, "run", s.url + "/openapi.json", "-c", CHECKS, "-n", "25", "--seed", "7",
               "--request-timeout", "60", "--phases", "examples,coverage,fuzzing"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:]
        assert "passed" in r.stdout and "failures" not in r.stdout.split("SUMMARY")[-1]
        assert s.proc.poll() is None  # the server survived the fuzzing
