"""Who holds the reused prefix in a real chat trace: shared prompts or session histories.

    python benchmarks/trace_sharing.py [--trace PATH]

For each request of a Mooncake trace (hash ids: one per 512-token block, chained), the
leading blocks already seen in an earlier request are its prefix hits with an unbounded
cache. Each hit block is classed by how many requests hold it: a prompt shared across
the service (a system prompt, a tool list) is held by very many; a conversation's own
history by that conversation's later turns only. The split sizes the shared system
prompts of benchmarks/router.py's chat workload: the share of its reuse that every
instance can find (shared prompts) against the share that only routing by affinity
finds (histories).

Writes benchmarks/results/trace_sharing.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import save  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
CLASSES = ((100, "held_by_100_or_more"), (20, "held_by_20_to_99"), (0, "held_by_under_20"))


def sharing(rows: list[list[int]]) -> dict:
    """Prefix-hit blocks (unbounded cache) by how many requests hold each block."""
    holders = collections.Counter(h for ids in rows for h in set(ids))
    seen: set[int] = set()
    hits = dict.fromkeys((name for _, name in CLASSES), 0)
    total = 0
    for ids in rows:
        for h in ids:
            if h not in seen:
                break
            hits[next(name for floor, name in CLASSES if holders[h] >= floor)] += 1
        total += len(ids)
        seen.update(ids)
    num_hits = sum(hits.values())
    return {"requests": len(rows), "prompt_blocks": total, "hit_blocks": num_hits,
            "hit_fraction": num_hits / total if total else 0.0,
            **{f"{k}_fraction": v / num_hits if num_hits else 0.0 for k, v in hits.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", type=Path, default=TRACE)
    args = ap.parse_args()
    with args.trace.open() as f:
        rows = [json.loads(line)["hash_ids"] for line in f if line.strip()]
    figures = sharing(rows)
    print(json.dumps(figures, indent=1))
    print(save("trace_sharing", {"trace": args.trace.name, "block_tokens": 512}, figures,
               {"method": "unbounded cache; a hit block's holders = requests whose hash "
                          "ids include it"}))


if __name__ == "__main__":
    main()
