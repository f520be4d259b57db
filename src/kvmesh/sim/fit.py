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

from kvmesh.sim.cost_model import FEATURES, NO_FUSED_LIMIT, StepFeatures


def fit_step_model(samples: Sequence[tuple[StepFeatures, float]],
                   fixed: dict[str, float] | None = None,
                   fused_rows: int = NO_FUSED_LIMIT
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    """Coefficients per feature name, and the fit's error figures.

    `fixed` coefficients (measured apart, such as block copies) are subtracted first;
    `fused_rows` is the engine's (`StepFeatures.is_unfused`).
    """
    if len(samples) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} samples, got {len(samples)}")
    fixed = fixed or {}
    x = np.array([f.vector(fused_rows) for f, _ in samples], dtype=np.float64)
    y = np.array([t for _, t in samples], dtype=np.float64)
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
        "num_samples": len(samples),
        "mean_abs_rel_error": float(rel.mean()),
        "p90_abs_rel_error": float(np.percentile(rel, 90)),
        "total_time_rel_error": float(total_rel),
        "r2": float(1 - ((pred - y) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)),
    }
    return {n: float(c) for n, c in zip(FEATURES, coef, strict=True)}, error
