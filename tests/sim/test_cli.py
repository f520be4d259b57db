"""`kvmesh profile`, `kvmesh sim` and `kvmesh plan` as a user runs them: real processes,
the real default model behind the real server for the profile, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def kvmesh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmesh.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> Path:
    """A cost model measured on the default model through the real server (the first row
    of the grid only: a short budget)."""
    out = tmp_path_factory.mktemp("profile") / "cost.json"
    r = kvmesh("profile", "--out", str(out), "--budget-s", "1", "--num-blocks", "512")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_profile_fits_the_default_model(profiled):
    doc = json.loads(profiled.read_text())
    assert doc["kind"] == "linear" and doc["shape"]["num_layers"] == 30  # SmolLM2-135M
    fit = doc["fit"]
    assert fit["num_samples"] >= 100 and fit["num_blocks"] == 512
    assert len(fit["samples"]) == fit["num_samples"]
    assert 0 <= fit["mean_abs_rel_error"] < 0.5
    coef = doc["coefficients"]
    assert min(coef.values()) >= 0 and coef["const"] + coef["num_tokens"] > 0
    assert doc["tiers"]["disk_read_s"] > 0 and doc["tiers"]["request_overhead_s"] >= 0
    rows = doc["fused_rows"]  # the engine's fused decode path: on every x86 CPU here
    assert rows >= 1
    for v in fit["samples"]:  # FEATURES in order, then the period: steps off that path
        assert v[10] == float(v[8] > 0 or v[1] > rows)
    assert {v[10] for v in fit["samples"]} == {0.0, 1.0}  # prefill steps and decode steps


def test_sim_and_plan_with_the_profiled_model(profiled, tmp_path):
    out, png = tmp_path / "sim.json", tmp_path / "ttft.png"
    r = kvmesh("sim", "--cost-model", str(profiled), "--dataset", "multiturn",
               "--num-requests", "4", "--turns", "2", "--input-len", "64", "--output-len",
               "8", "--rate", "2", "--num-blocks", "512", "--host-bytes", "100000000",
               "--out", str(out), "--plot", str(png), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    f = doc["figures"]
    assert f["completed"] == 8 and f["failed"] == 0 and len(doc["records"]) == 8
    assert f["ttft_s"]["p50"] > 0 and f["tpot_s"]["mean"] > 0
    assert f["cached_tokens"] > 0  # the second turns reuse the first
    assert f["wall_s"] < 60 and png.stat().st_size > 1000
    assert (tmp_path / "ttft_tiers.png").stat().st_size > 1000
    plan_out = tmp_path / "plan.json"
    r = kvmesh("plan", "--cost-model", str(profiled), "--dataset", "random",
               "--num-requests", "12", "--input-len", "32", "--output-len", "8",
               "--instance-per-hour", "2.5", "--instances", "1,2", "--host-gb", "0,1",
               "--slo", "ttft_ms=100000", "--num-blocks", "512", "--out", str(plan_out),
               "--plot", str(tmp_path / "frontier.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(plan_out.read_text())["figures"]
    assert len(plan["ranked"]) == 4 and plan["best"]["price_per_hour"] == 2.5
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_sim_replays_a_trace_with_tiers(tmp_path):
    if not TRACE.is_file():
        pytest.skip("shared traces not present")
    out = tmp_path / "trace.json"
    r = kvmesh("sim", "--cost-model", "roofline:h100:llama-3.1-8b", "--dataset", "trace",
               "--trace", str(TRACE), "--num-requests", "200", "--length-scale", "0.25",
               "--num-instances", "2", "--route", "least_load", "--host-bytes", "2000000000",
               "--disk-path", str(tmp_path / "unused"), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(out.read_text())["figures"]
    assert f["completed"] == 200 and set(f["tiers"]) >= {"device", "host", "disk"}
    assert not (tmp_path / "unused").exists()  # the simulator writes no disk tier


@pytest.mark.parametrize("args, message", [
    (["--cost-model", "nope.json"], "neither a file nor roofline"),
    (["--route", "random"], "unknown route"),
    (["--dataset", "trace"], "needs a trace file"),
    (["--cost-model", "roofline:tpu:x"], "unknown GPU"),
    (["--speculative-method", "ngram"], "does not model speculative decoding"),
])
def test_sim_refuses_bad_input_clearly(args, message):
    r = kvmesh("sim", "--no-progress", "--num-requests", "2", *args, timeout=120)
    assert r.returncode == 2
    assert message in " ".join(r.stderr.replace("│", " ").split())  # unwrap rich's box
