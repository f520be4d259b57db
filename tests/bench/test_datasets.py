"""Workload builders, including replay of the real traces in ../shared/traces."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.bench import datasets as ds
from kvmesh.bench.metrics import SLO, percentile
from kvmesh.bench.runner import LoadProfile, arrival_times

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"


def test_shared_prefix_and_longdoc_repeat_text():
    groups = ds.shared_prefix_dataset(8, 2, 50, 5, 4, seed=1)
    assert groups[0].turns[0].user_text.split("\n")[0] == groups[2].turns[0].user_text.split(
        "\n")[0]
    docs = ds.longdoc_dataset(10, 2, 100, 5, 4, seed=1)
    assert len({s.meta["doc"] for s in docs}) == 2


def test_mooncake_equal_hash_ids_give_equal_text():
    path = TRACES / "mooncake_conversation_trace.jsonl"
    if not path.exists():
        pytest.skip("shared traces not present")
    sessions = ds.trace_dataset(path, 50, 0.5, 1 / 32, 64, seed=0)
    assert len(sessions) == 50
    assert [s.arrival_s for s in sessions] == sorted(s.arrival_s for s in sessions)
    assert ds.block_text(7, 10) == ds.block_text(7, 10) != ds.block_text(8, 10)


def test_azure_trace_scales_time_and_lengths():
    path = TRACES / "azure_llm_2023_conv.csv"
    if not path.exists():
        pytest.skip("shared traces not present")
    full = ds.trace_dataset(path, 20, 1.0, 1.0, 10**6, seed=0)
    half = ds.trace_dataset(path, 20, 0.5, 0.1, 8, seed=0)
    assert half[-1].arrival_s == pytest.approx(full[-1].arrival_s / 2)
    assert all(s.turns[0].max_tokens <= 8 for s in half)


def test_arrivals_and_slo_parsing():
    sessions = ds.random_dataset(200, 10, 4, 0.3, seed=0)
    times = arrival_times(sessions, LoadProfile(rate=10.0, seed=1))
    assert times[0] == 0 and times == sorted(times)
    assert 12 < times[-1] < 28  # about 200 / 10 s
    bursty = arrival_times(sessions, LoadProfile(rate=10.0, burstiness=0.2, seed=1))
    gaps = [b - a for a, b in zip(bursty, bursty[1:], strict=False)]
    assert percentile(gaps, 99) > percentile(
        [b - a for a, b in zip(times, times[1:], strict=False)], 99)
    assert SLO.parse("ttft_ms=500,tpot_ms=20") == SLO(ttft_ms=500, tpot_ms=20)
    with pytest.raises(ValueError, match="bad SLO"):
        SLO.parse("p99=1")


def test_a_workload_s_cli_args_are_what_kvmesh_bench_parses_back():
    import typer

    from kvmesh.bench.workload import WorkloadConfig
    from kvmesh.cli import app

    bench = typer.main.get_command(app).commands["bench"]  # type: ignore[attr-defined]
    for w in (WorkloadConfig(dataset="shared-prefix", num_requests=7, input_len=33, groups=3,
                             rate=2.5, seed=4),
              WorkloadConfig(dataset="multiturn", turns=5, concurrency=2, burstiness=0.5)):
        params = bench.make_context("bench", w.cli_args()).params
        for name, value in vars(w).items():
            if value is not None:
                assert params[name] == value, name
        # an unset field is kvmesh bench's own default: the same stop as the workload's
        # profile (sim_fidelity sends a WorkloadConfig to `kvmesh bench` and to the sim)
        if w.max_duration_s is None:
            assert params["max_duration_s"] == w.profile().max_duration_s
