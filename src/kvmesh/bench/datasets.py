"""Workloads: random, shared-prefix, multi-turn chat, long-document QA, trace replay.

A workload is a list of sessions; each session is a list of turns sent one after another
(a single-turn request is a session of one). Text is built from a fixed word list with a
seeded RNG, so runs are reproducible and equal seeds make equal prompts.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "they",
    "be",
    "this",
    "which",
    "or",
    "an",
    "had",
    "not",
    "are",
    "but",
    "were",
    "their",
    "one",
    "all",
    "has",
    "been",
    "have",
    "new",
    "more",
    "time",
    "also",
    "there",
    "when",
    "who",
    "into",
    "year",
    "other",
    "after",
    "first",
    "two",
    "would",
    "many",
    "some",
    "most",
    "its",
    "where",
    "these",
    "only",
    "may",
    "over",
    "city",
    "world",
    "system",
    "model",
    "data",
    "cache",
    "memory",
    "token",
    "block",
    "server",
    "request",
    "engine",
    "network",
    "river",
    "mountain",
    "garden",
    "library",
    "history",
    "science",
    "music",
    "market",
    "energy",
    "water",
    "light",
    "story",
    "people",
    "number",
    "family",
    "school",
    "report",
    "policy",
    "design",
    "process",
    "value",
    "result",
    "level",
    "point",
]


@dataclass
class Turn:
    user_text: str
    max_tokens: int


@dataclass
class Session:
    turns: list[Turn]
    arrival_s: float = 0.0  # when the first turn is sent, relative to the start
    system: str | None = None
    think_s: float = 0.0  # pause between a reply and the next turn
    meta: dict = field(default_factory=dict)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def block_text(block_id: int, n_words: int) -> str:
    """Deterministic text for a trace block id: equal ids give equal text."""
    return words(random.Random(block_id * 7919 + 17), n_words)


def random_dataset(
    n: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[Session]:
    rng = random.Random(seed)
    lo, hi = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
    return [
        Session([Turn(words(rng, rng.randint(max(1, lo), max(1, hi))), output_len)])
        for _ in range(n)
    ]


def shared_prefix_dataset(
    n: int, num_groups: int, prefix_len: int, suffix_len: int, output_len: int, seed: int
) -> list[Session]:
    rng = random.Random(seed)
    prefixes = [words(rng, prefix_len) for _ in range(num_groups)]
    return [
        Session(
            [Turn(prefixes[i % num_groups] + "\n" + words(rng, suffix_len), output_len)],
            meta={"group": i % num_groups},
        )
        for i in range(n)
    ]


def multiturn_dataset(
    num_sessions: int, turns: int, user_len: int, output_len: int, seed: int, system_len: int = 200
) -> list[Session]:
    rng = random.Random(seed)
    return [
        Session(
            [Turn(words(rng, user_len), output_len) for _ in range(turns)],
            system=words(rng, system_len),
        )
        for _ in range(num_sessions)
    ]


def longdoc_dataset(
    n: int, num_docs: int, doc_len: int, question_len: int, output_len: int, seed: int
) -> list[Session]:
    rng = random.Random(seed)
    docs = [words(rng, doc_len) for _ in range(num_docs)]
    out = []
    for _ in range(n):
        d = rng.randrange(num_docs)
        out.append(
            Session(
                [Turn(docs[d] + "\n\nQuestion: " + words(rng, question_len), output_len)],
                meta={"doc": d},
            )
        )
    return out


def mooncake_trace(
    path: Path,
    limit: int,
    time_scale: float,
    length_scale: float,
    max_output: int,
    words_per_block: int = 512,
) -> list[Session]:
    """Mooncake rows: timestamp (ms), input_length, output_length, hash_ids (512-token blocks).

    Each hash id becomes a fixed block of text; lengths shrink by `length_scale`.
    """
    out: list[Session] = []
    with path.open() as f:
        for line in f:
            if len(out) >= limit:
                break
            row = json.loads(line)
            per_block = max(1, int(words_per_block * length_scale))
            ids = row["hash_ids"]
            tail = row["input_length"] - 512 * (len(ids) - 1)
            parts = [block_text(h, per_block) for h in ids[:-1]]
            parts.append(block_text(ids[-1], max(1, int(tail * length_scale))) if ids else "")
            out.append(
                Session(
                    [
                        Turn(
                            " ".join(parts),
                            max(1, min(max_output, int(row["output_length"] * length_scale))),
                        )
                    ],
                    arrival_s=row["timestamp"] / 1000.0 * time_scale,
                )
            )
    return out


def azure_trace(
    path: Path, limit: int, time_scale: float, length_scale: float, max_output: int, seed: int
) -> list[Session]:
    rng = random.Random(seed)
    out: list[Session] = []
    with path.open() as f:
        reader = csv.DictReader(f)
        t0 = None
        for row in reader:
            if len(out) >= limit:
                break
            from datetime import datetime

            ts = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            t0 = ts if t0 is None else t0
            n_in = max(1, int(int(row["ContextTokens"]) * length_scale))
            n_out = max(1, min(max_output, int(int(row["GeneratedTokens"]) * length_scale)))
            out.append(Session([Turn(words(rng, n_in), n_out)], arrival_s=(ts - t0) * time_scale))
    return out


def trace_dataset(
    path: Path, limit: int, time_scale: float, length_scale: float, max_output: int, seed: int
) -> list[Session]:
    if path.suffix == ".jsonl":
        return mooncake_trace(path, limit, time_scale, length_scale, max_output)
    if path.suffix == ".csv":
        return azure_trace(path, limit, time_scale, length_scale, max_output, seed)
    raise ValueError(
        f"unknown trace format {path.suffix!r}: expected .jsonl (Mooncake) or .csv (Azure)"
    )
