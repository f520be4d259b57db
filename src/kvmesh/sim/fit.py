"""Least-squares fit of the linear step-cost model, with non-negative coefficients.

Each sample is a step's `StepFeatures` and its measured wall time. Non-negativity keeps
the model physical (no feature makes a step faster) and stable when extrapolating; it is
solved by the active-set method: fit, drop the most negative coefficient, refit.
Rows are weighted by 1 / sqrt(measured time): between absolute least squares (where the
long prefill steps drown the short decode steps that set TPOT) and relative error (where
a few slow short steps bend the prefill terms). On the fidelity workloads this weighting
gave the lowest TTFT errors at a like TPOT and throughput error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvmesh.sim.cost_model import (
    FEATURES,
    NO_FUSED_LIMIT,
    LinearCostModel,
    StepFeatures,
    TierCosts,
)


def fit_step_model(samples: Sequence[tuple[StepFeatures, float]],
                   fixed: dict[str, float] | None = None,
                   fused_rows: int = NO_FUSED_LIMIT
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    """Coefficients per feature name, and the fit's error figures.

    `fixed` coefficients (measured apart, such as block copies) are subtracted first;
    `fused_rows` is the engine's (`StepFeatures.is_unfused`).
    """
    return fit_vectors([[*f.vector(fused_rows), t] for f, t in samples], fixed, fused_rows)


def fit_vectors(rows: Sequence[Sequence[float]], fixed: dict[str, float] | None = None,
                fused_rows: int = NO_FUSED_LIMIT) -> tuple[dict[str, float], dict[str, Any]]:
    """`fit_step_model` on samples stored as a profile keeps them: each row the features'
    values in FEATURES order, then the measured period."""
    if len(rows) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} samples, got {len(rows)}")
    fixed = fixed or {}
    data = np.array(rows, dtype=np.float64)
    x, y = data[:, :len(FEATURES)], data[:, len(FEATURES)]
    fixed_vec = np.array([fixed.get(n, 0.0) for n in FEATURES])
    target = y - x @ fixed_vec
    active = [i for i, n in enumerate(FEATURES) if n not in fixed and x[:, i].any()
              and not (n == "unfused_step" and fused_rows == 0)]  # then the same as const
    w = 1.0 / np.sqrt(np.maximum(y, 1e-6))
    coef = np.zeros(len(FEATURES))
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], target * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    coef += fixed_vec
    pred = x @ coef
    rel = np.abs(pred - y) / np.maximum(y, 1e-9)
    total_rel = abs(pred.sum() - y.sum()) / y.sum()
    error = {
        "num_samples": len(rows),
        "mean_abs_rel_error": float(rel.mean()),
        "p90_abs_rel_error": float(np.percentile(rel, 90)),
        "total_time_rel_error": float(total_rel),
        "r2": float(1 - ((pred - y) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)),
    }
    return {n: float(c) for n, c in zip(FEATURES, coef, strict=True)}, error


def merge_profiles(models: Sequence[LinearCostModel]) -> LinearCostModel:
    """One cost model from several profiles of the same engine on the same machine (taken
    at different times: a shared machine's speed drifts by 10-30% within an hour): their
    step samples pooled and fitted again, the separately measured costs (block copies,
    disk reads, request overhead) averaged."""
    if not models:
        raise ValueError("no profiles to merge")
    first = models[0]
    engine = lambda m: (m.shape, m.fused_rows, m.kv_dtype_bytes, m.tiers.disk_io_threads,  # noqa: E731
                        *(m.fit.get(k) for k in ("block_size", "dtype", "quantization")))
    if any(engine(m) != engine(first) for m in models):
        raise ValueError("profiles of different engines (model, dtype, quantization, block "
                         "size, fused rows or I/O threads) do not merge")
    width = len(FEATURES) + 1
    for i, m in enumerate(models):
        samples = m.fit.get("samples") or []
        if not samples or any(len(row) != width for row in samples):
            raise ValueError(f"profile {i} has no step samples of this version's "
                             f"{len(FEATURES)} features (profile again with `kvmesh profile`)")
    mean = lambda get: sum(get(m) for m in models) / len(models)  # noqa: E731
    fixed = {n: mean(lambda m, n=n: m.coefficients[n]) for n in ("num_loads", "num_stores")}
    rows = [row for m in models for row in m.fit["samples"]]
    coef, error = fit_vectors(rows, fixed, first.fused_rows)
    t = first.tiers
    tiers = TierCosts(mean(lambda m: m.tiers.disk_read_s), t.disk_io_threads,
                      mean(lambda m: m.tiers.request_overhead_s),
                      mean(lambda m: m.tiers.token_overhead_s))
    merged = sum(m.fit.get("merged_profiles", 1) for m in models)
    fit = {**first.fit, **error, "samples": rows, "merged_profiles": merged,
           "profile_s": sum(m.fit.get("profile_s", 0.0) for m in models)}
    return LinearCostModel(first.shape, coef, first.kv_dtype_bytes, tiers, fit,
                           first.fused_rows)
