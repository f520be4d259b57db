"""JSON results and PNG plots (TTFT CDF; latency vs rate for a sweep)."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import os

    from kvmesh.model.cpu_isa import cpu_model, describe

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **describe(),  # family, model number, ISA level and SIMD flags
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["gpu"] = None
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def result_doc(
    name: str,
    command: str,
    config: dict[str, Any],
    figures: dict[str, Any],
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "benchmark": name,
        "git_commit": git_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": command,
        "config": config,
        "figures": figures,
        "notes": notes or {},
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def plot_ttft_cdf(series: dict[str, list[float]], path: Path, title: str = "TTFT CDF") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        s = sorted(values)
        if s:
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
    _finish(fig, ax, "TTFT (s)", "fraction of requests", title, path)


def plot_sweep(rates: list[float], summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in ("ttft_s", "e2e_s"):
        for p in ("p50", "p99"):
            ax.plot(rates, [s[metric][p] for s in summaries], marker="o", label=f"{metric} {p}")
    _finish(fig, ax, "request rate (req/s)", "latency (s)", "latency vs rate", path)


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_frontier(rows: list[dict[str, Any]], frontier: list[dict[str, Any]], path: Path,
                  title: str = "throughput vs price") -> None:
    """Every planned candidate (filled: meets the SLO), with the frontier drawn through."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ok, marker in ((True, "o"), (False, "x")):
        pts = [r for r in rows if r["meets_slo"] is ok]
        ax.scatter([r["price_per_hour"] for r in pts], [r["output_tok_per_s"] for r in pts],
                   marker=marker, label="meets SLO" if ok else "misses SLO")
    ax.plot([r["price_per_hour"] for r in frontier], [r["output_tok_per_s"] for r in frontier],
            linestyle="--", label="frontier")
    _finish(fig, ax, "price ($/hour)", "output tokens/s", title, path)


def plot_tier_hits(tiers: dict[str, Any], path: Path, title: str = "prefix hits by tier") -> None:
    """Bars: prompt tokens served by each tier (the `tiers` figures of `kvmesh sim`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in tiers.items() if isinstance(v, dict)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, [tiers[k]["hit_tokens"] for k in names])
    _finish(fig, ax, "tier", "hit tokens", title, path)
