"""Cost models (features, roofline formulas, the fit), routing policies and the planner:
pure, with exact expected values."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from kvmesh.bench.metrics import SLO
from kvmesh.config import CacheConfig, SchedulerConfig, TierConfig
from kvmesh.engine.batch import ExecuteBatch, SeqWork
from kvmesh.sim import cost_model as cm
from kvmesh.sim.fit import fit_step_model, fit_vectors, merge_profiles
from kvmesh.sim.instance import InstanceSpec
from kvmesh.sim.planner import Candidate, Prices, SearchSpace, frontier, plan
from kvmesh.sim.shapes import MODELS
from kvmesh.sim.workload import SimWorkload, TokenSession
from kvmesh.types import SamplingParams


def seq(n: int, start: int, sampling: bool = True) -> SeqWork:
    ids = list(range(start + n))
    return SeqWork("r", ids[start:], start, [0], sampling, SamplingParams(), None, ids, ids)


def test_step_features_of_a_mixed_batch():
    batch = ExecuteBatch((seq(1, 99), seq(1, 9), seq(10, 20, sampling=False)),
                         stores=((0, b"k"),), loads=((1, b"a"), (2, b"b")))  # type: ignore[arg-type]
    f = cm.step_features(batch, 16)
    assert (f.num_seqs, f.num_tokens, f.num_sampling) == (3, 12, 2)
    assert f.decode_ctx_tokens == 100 + 10
    assert f.prefill_pair_ktokens == pytest.approx(10 * (20 + 5.5) / 1000)
    assert f.prefill_kv_tokens == 30 and (f.num_loads, f.num_stores) == (2, 1)


def test_decode_kv_counts_each_shared_full_block_once():
    def decode(start: int, table: list[int]) -> SeqWork:
        ids = list(range(start + 1))
        return SeqWork("r", ids[start:], start, table, True, SamplingParams(), None, ids, ids)

    batch = ExecuteBatch((decode(47, [5, 6, 7]),  # 48 tokens: three full blocks
                          decode(40, [5, 6, 9]),  # two full blocks, both read above
                          decode(35, [5, 7, 11]),  # 5 and 7 read above, 11 its partial tail
                          decode(20, [8, 10]),  # one full block of its own
                          seq(10, 20, sampling=False)))  # a prefill: never counted
    f = cm.step_features(batch, 16)
    assert f.decode_ctx_tokens == 48 + 41 + 36 + 21
    assert f.decode_shared_tokens == (2 + 2) * 16
    assert f.decode_kv_tokens == f.decode_ctx_tokens - 64
    model = cm.LinearCostModel(MODELS["smollm2-135m"], {"decode_ctx_tokens": 1e-6,
                                                       "decode_kv_tokens": 3e-6})
    assert model.step_s(f) == pytest.approx(1e-6 * 146 + 3e-6 * 82)
    steps = model.decode_run_s(f, 3, [0, 0, 0])  # each step: one private token per sequence
    assert steps[2] - steps[0] == pytest.approx(2 * f.num_seqs * (1e-6 + 3e-6))


def test_steps_off_the_fused_path_pay_its_fixed_cost():
    """A prefill chunk, or more decodes than `fused_rows`, runs op by op: `unfused_step`
    prices that once per step, and a decode run prices each of its steps as `step_s`."""
    model = cm.LinearCostModel(MODELS["smollm2-135m"], {"const": 0.008, "num_seqs": 1e-3,
                                                       "decode_ctx_tokens": 1e-6,
                                                       "unfused_step": 0.03}, fused_rows=4)
    decodes = [cm.step_features(ExecuteBatch(tuple(seq(1, 50 + i) for i in range(k))), 16)
               for k in (4, 5)]
    assert [f.is_unfused(4) for f in decodes] == [False, True]
    assert model.step_s(decodes[0]) == pytest.approx(0.008 + 4e-3 + 1e-6 * 210)
    assert model.step_s(decodes[1]) == pytest.approx(0.038 + 5e-3 + 1e-6 * 265)
    mixed = cm.step_features(ExecuteBatch((seq(1, 50), seq(2, 0, sampling=False))), 16)
    assert mixed.is_unfused(4) and model.step_s(mixed) == pytest.approx(0.038 + 2e-3 + 51e-6)
    for f in decodes:  # bit for bit: the simulator's decode runs rely on it
        run = model.decode_run_s(f, 3, [0, 0, 0])
        grown = [dataclasses.replace(f, decode_ctx_tokens=f.decode_ctx_tokens + j * f.num_seqs)
                 for j in range(3)]
        assert run == [model.step_s(g) for g in grown]
    assert cm.from_json(model.to_json()).fused_rows == 4  # type: ignore[union-attr]


def test_a_fused_steps_cost_is_piecewise_linear_in_its_sequences():
    model = cm.LinearCostModel(MODELS["smollm2-135m"], {"fused_seqs_2_4": 1e-3,
                                                       "fused_seqs_4_8": 5e-4,
                                                       "fused_seqs_32_up": 1e-4},
                               fused_rows=40)
    cost = {k: model.step_s(cm.StepFeatures(num_seqs=k, num_tokens=k))
            for k in (1, 2, 3, 4, 6, 8, 30, 40, 41)}
    assert cost[1] == cost[2] == 0.0 and cost[3] == pytest.approx(1e-3)
    assert cost[4] == pytest.approx(2e-3) and cost[6] == pytest.approx(3e-3)
    assert cost[8] == cost[30] == pytest.approx(4e-3)
    assert cost[40] == pytest.approx(4.8e-3) and cost[41] == 0.0  # 41: op by op
    f = cm.StepFeatures(num_seqs=6, num_tokens=6, num_sampling=6, decode_ctx_tokens=600)
    assert model.decode_run_s(f, 2, [0, 0]) == [model.step_s(f)] * 2
    every = cm.LinearCostModel(MODELS["smollm2-135m"], {n: 1e-3 / (i + 1) for i, n in
                                                       enumerate(cm.FEATURES)}, fused_rows=16)
    for s in (3, 12, 17, 40):  # bit for bit, every term non-zero (unfused from 17)
        f = cm.StepFeatures(s, s, s, 100 * s, decode_shared_tokens=16 * s)
        grown = [dataclasses.replace(f, decode_ctx_tokens=f.decode_ctx_tokens + j * s,
                                     num_stores=j) for j in range(3)]
        assert every.decode_run_s(f, 3, [0, 1, 2]) == [every.step_s(g) for g in grown]


def test_cost_models_from_before_the_two_paths_still_load():
    """A profile saved before `unfused_step`, the segments and `fused_rows` existed prices
    every step as its ten coefficients did."""
    old = {"const": 0.0034, "num_seqs": 7.6e-4, "num_tokens": 7.3e-4, "num_sampling": 0.0,
           "decode_ctx_tokens": 7.9e-7, "prefill_pair_ktokens": 5.4e-4, "num_loads": 7.4e-5,
           "num_stores": 6.5e-5, "num_prefill_seqs": 5.5e-3, "decode_kv_tokens": 2.4e-6}
    doc = {"kind": "linear", "shape": MODELS["smollm2-135m"].to_json(), "coefficients": old,
           "kv_dtype_bytes": 2, "tiers": {}, "fit": {}}
    model = cm.from_json(doc)
    assert model.fused_rows == cm.NO_FUSED_LIMIT  # type: ignore[union-attr]
    for f in (cm.StepFeatures(1, 1, 1, 300), cm.StepFeatures(80, 80, 80, 9000),
              cm.StepFeatures(3, 130, 3, 400, 9.5, num_loads=2, num_prefill_seqs=1)):
        x = f.vector()
        expected = 0.0
        for c, v in zip(old.values(), x[:10], strict=True):
            expected += c * v
        assert model.step_s(f) == expected


def test_roofline_decode_is_memory_bound_and_prefill_compute_bound():
    m = cm.roofline("h100", "llama-3.1-8b")
    s = MODELS["llama-3.1-8b"]
    decode = cm.StepFeatures(num_seqs=1, num_tokens=1, num_sampling=1, decode_ctx_tokens=1)
    weights_s = s.num_params * 2 / (3350e9 * 0.8)
    assert m.step_s(decode) == pytest.approx(m.overhead_s + weights_s, rel=1e-3)
    assert 7.5e9 < s.num_params < 8.5e9  # the published 8B, embeddings counted once
    prefill = cm.StepFeatures(num_seqs=1, num_tokens=8192, num_sampling=1,
                              prefill_pair_ktokens=8192 * 4096.5 / 1000, prefill_kv_tokens=8192)
    flops = 2 * (s.num_params - s.hidden_size * s.vocab_size) * 8192
    assert m.step_s(prefill) > m.overhead_s + flops / (989e12 * 0.6)
    copies = cm.StepFeatures(num_loads=4, block_size=16)
    assert m.step_s(copies) == pytest.approx(4 * 16 * s.kv_bytes_per_token(2) / 55e9)


def test_cost_models_round_trip_through_json(tmp_path):
    lin = cm.LinearCostModel(MODELS["smollm2-135m"], {"const": 0.01, "num_tokens": 1e-4},
                             tiers=cm.TierCosts(disk_read_s=0.002, request_overhead_s=0.003))
    for model in (lin, cm.roofline("a100", "qwen2.5-32b")):
        path = tmp_path / f"{model.kind}.json"
        cm.save(model, path)
        back = cm.load(str(path))
        assert back.to_json() == model.to_json()
    f = cm.StepFeatures(num_seqs=2, num_tokens=5)
    assert lin.step_s(f) == pytest.approx(0.01 + 5e-4)
    assert cm.load("roofline:l4:llama-3.1-8b").kind == "roofline"
    with pytest.raises(ValueError, match="unknown GPU"):
        cm.load("roofline:tpu:llama-3.1-8b")
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "linear"}))
    with pytest.raises(ValueError, match="not a cost model"):
        cm.load(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="unknown cost-model features"):
        cm.LinearCostModel(MODELS["smollm2-135m"], {"flux": 1.0})


def test_fit_recovers_known_coefficients_and_keeps_them_non_negative():
    true = {"const": 0.004, "num_seqs": 2e-4, "num_tokens": 5e-5, "decode_ctx_tokens": 1e-7,
            "prefill_pair_ktokens": 3e-6, "decode_kv_tokens": 4e-7, "unfused_step": 0.02}
    model = cm.LinearCostModel(MODELS["smollm2-135m"], true, fused_rows=16)
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        s = rng.randrange(1, 64)
        prefill = rng.random() < 0.3
        n = rng.randrange(16, 512) if prefill else s
        sampling = rng.randrange(0, s + 1) if prefill else s
        ctx = 0 if prefill else s * rng.randrange(10, 2000)
        f = cm.StepFeatures(s, n, sampling, ctx,
                            n * rng.randrange(0, 1000) / 1000 if prefill else 0.0,
                            decode_shared_tokens=rng.randrange(0, ctx // 2 + 1),
                            num_prefill_seqs=int(prefill))
        samples.append((f, model.step_s(f)))
    coef, err = fit_step_model(samples, fused_rows=16)
    for name, value in true.items():
        assert coef[name] == pytest.approx(value, rel=1e-6)
    assert err["mean_abs_rel_error"] < 1e-9 and err["r2"] > 0.999999
    noisy = [(f, t * (1.2 if i % 2 else 0.8)) for i, (f, t) in enumerate(samples)]
    coef, err = fit_step_model(noisy, fixed={"num_loads": 1e-4}, fused_rows=16)
    assert min(coef.values()) >= 0 and coef["num_loads"] == 1e-4
    assert 0.1 < err["mean_abs_rel_error"] < 0.3
    with pytest.raises(ValueError, match="at least"):
        fit_step_model(samples[:3])


def _profiled(true: dict[str, float], speed: float, seed: int,
              fused_rows: int = 16) -> cm.LinearCostModel:
    """A profile as `kvmesh profile` saves one, of a machine `speed` times slower."""
    model = cm.LinearCostModel(MODELS["smollm2-135m"], true, fused_rows=fused_rows)
    rng = random.Random(seed)
    rows = []
    for _ in range(120):
        s = rng.randrange(1, 48)
        prefill = rng.random() < 0.3
        f = cm.StepFeatures(s, rng.randrange(16, 512) if prefill else s, s,
                            0 if prefill else s * rng.randrange(10, 2000),
                            num_prefill_seqs=int(prefill), num_loads=rng.randrange(0, 3))
        rows.append([*f.vector(fused_rows), speed * model.step_s(f)])
    coef, err = fit_vectors(rows, {"num_loads": speed * true["num_loads"]}, fused_rows)
    tiers = cm.TierCosts(disk_read_s=speed * 1e-3, request_overhead_s=speed * 5e-3)
    return cm.LinearCostModel(model.shape, coef, 2, tiers, {**err, "samples": rows},
                              fused_rows)


def test_merged_profiles_refit_the_pooled_samples():
    true = {"const": 0.004, "num_tokens": 5e-5, "num_sampling": 3e-4, "unfused_step": 0.02,
            "num_prefill_seqs": 0.005, "decode_ctx_tokens": 1e-7, "num_loads": 1e-4}
    fast, slow = _profiled(true, 1.0, 1), _profiled(true, 1.3, 2)
    again = merge_profiles([fast])
    assert again.coefficients == pytest.approx(fast.coefficients, abs=1e-12)
    both = merge_profiles([fast, slow])
    assert both.fit["merged_profiles"] == 2 and both.fit["num_samples"] == 240
    for name in ("const", "unfused_step", "num_tokens"):  # between the two machines' speeds
        assert true[name] < both.coefficients[name] < 1.3 * true[name]
    assert both.coefficients["num_loads"] == pytest.approx(1.15e-4)
    assert both.tiers.disk_read_s == pytest.approx(1.15e-3)
    assert both.tiers.request_overhead_s == pytest.approx(5.75e-3)
    f = cm.StepFeatures(8, 8, 8, 8000)
    assert fast.step_s(f) < both.step_s(f) < slow.step_s(f)
    assert merge_profiles([both, fast]).fit["merged_profiles"] == 3
    with pytest.raises(ValueError, match="do not merge"):
        merge_profiles([fast, _profiled(true, 1.0, 3, fused_rows=8)])
    other_dtype = dataclasses.replace(slow, fit={**slow.fit, "dtype": "float32"})
    with pytest.raises(ValueError, match="do not merge"):
        merge_profiles([dataclasses.replace(fast, fit={**fast.fit, "dtype": "bfloat16"}),
                        other_dtype])
    for samples in ([], [row[:-2] for row in fast.fit["samples"]]):  # none; an old layout
        with pytest.raises(ValueError, match="no step samples"):
            merge_profiles([fast, dataclasses.replace(slow, fit={**slow.fit,
                                                                 "samples": samples})])
    with pytest.raises(ValueError, match="no profiles"):
        merge_profiles([])


def test_saved_profile_keeps_samples_and_strings(tmp_path):
    model = _profiled({"const": 0.004, "num_tokens": 5e-5, "num_loads": 1e-4}, 1.0, 4)
    model = dataclasses.replace(model, fit={**model.fit, "note": "x[\n 1, 2\n]y [ 3 ]"})
    cm.save(model, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert text.count("\n") < 100 + len(model.fit["samples"])  # a sample row per line
    back = cm.load(str(tmp_path / "m.json"))
    assert back.fit == model.fit and back.coefficients == model.coefficients


def _workload(n: int = 48) -> list[TokenSession]:
    rng = random.Random(1)
    prefix = [rng.randrange(1000, 9000) for _ in range(256)]
    return [TokenSession(i * 0.02, [32], prompts=[prefix + [rng.randrange(1000, 9000)
                                                            for _ in range(64)]])
            for i in range(n)]


def test_planner_picks_the_cheapest_fleet_that_meets_the_slo():
    sessions = _workload()
    work = SimWorkload(sessions, [s.arrival_s for s in sessions])
    base = InstanceSpec(SchedulerConfig(max_num_seqs=8), CacheConfig(num_blocks=2048),
                        TierConfig())
    cost = cm.roofline("l4", "llama-3.1-8b")
    space = SearchSpace(instances=(1, 2, 4, 8), host_gb=(0.0, 4.0), disk_gb=(0.0,))
    prices = Prices(instance_per_hour=1.0, host_gb_per_hour=0.01)
    loose, tight = SLO(tpot_ms=1000.0), SLO(ttft_ms=300.0)
    rows = plan(space, base, cost, prices, tight, work)
    assert len(rows) == 8
    ok = [r for r in rows if r["meets_slo"]]
    assert ok and not all(r["meets_slo"] for r in rows)  # the SLO binds
    best = rows[0]
    assert best["meets_slo"] and best["price_per_hour"] == min(r["price_per_hour"] for r in ok)
    assert best["candidate"]["num_instances"] > 1  # one L4 cannot meet it
    assert plan(space, base, cost, prices, loose, work)[0]["price_per_hour"] == 1.0
    front = frontier(rows)
    assert front and all(r["meets_slo"] for r in front)
    assert front[0]["price_per_hour"] == min(r["price_per_hour"] for r in ok)
    tputs = [r["output_tok_per_s"] for r in front]
    assert tputs == sorted(tputs) and len(set(tputs)) == len(tputs)
    assert prices.per_hour(Candidate(2, 4.0, 0.0, 16, "round_robin")) == pytest.approx(2.08)
    assert SearchSpace(instances=(1,), host_gb=(0.0,), disk_gb=(10.0,)).candidates() == []
    wide = Candidate(1, 4.0, 8.0, 32, "session", "s3fifo").spec(base)
    assert wide.cache.num_blocks == 1024 and wide.cache.block_size == 32  # same memory
    assert wide.tiers.disk_path is not None and wide.tiers.host_policy == "s3fifo"
    assert len(SearchSpace(host_gb=(0.0, 1.0), evictions=("lru", "s3fifo")).candidates()) == 9
