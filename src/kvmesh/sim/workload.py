"""Simulated sessions: token ids per turn, built the way the server would build them.

- `ChatSession`: a `kvmesh bench` session (text) through the model's tokenizer and chat
  template, turn by turn; a reply is the tokens the simulated engine produced, decoded and
  sent back as the assistant message, as the bench client does.
- `TokenSession`: prompts that are token ids already (traces). Mooncake `hash_ids` become
  fixed blocks of token ids (equal ids, equal tokens); Azure rows become random prompts of
  the given length (no reuse, as in the trace).
"""

from __future__ import annotations

import abc
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvmesh.bench.datasets import Session

MOONCAKE_BLOCK_TOKENS = 512
TOKEN_LOW, TOKEN_HIGH = 1000, 30000  # trace token ids: ordinary, never special ones


class ChatTokenizer(Protocol):
    def encode_chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class SimSession(abc.ABC):
    """One session: `prompt(turn, replies)` gives a turn's prompt token ids, from the
    replies (token ids) to the turns before it. Stateless: a workload can be rerun."""

    arrival_s: float
    max_tokens: list[int]
    think_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return len(self.max_tokens)

    @abc.abstractmethod
    def prompt(self, turn: int, replies: Sequence[list[int]]) -> list[int]: ...


@dataclass
class TokenSession(SimSession):
    prompts: list[list[int]] = field(default_factory=list)

    def prompt(self, turn: int, replies: Sequence[list[int]]) -> list[int]:
        return self.prompts[turn]


@dataclass
class ChatSession(SimSession):
    session: Session | None = None
    tokenizer: ChatTokenizer | None = None

    def prompt(self, turn: int, replies: Sequence[list[int]]) -> list[int]:
        assert self.session is not None and self.tokenizer is not None
        s = self.session
        messages = [{"role": "system", "content": s.system}] if s.system else []
        for i in range(turn + 1):
            messages.append({"role": "user", "content": s.turns[i].user_text})
            if i < turn:
                messages.append({"role": "assistant",
                                 "content": self.tokenizer.decode(replies[i])})
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)


def from_bench(sessions: Sequence[Session], tokenizer: ChatTokenizer) -> list[SimSession]:
    """`kvmesh bench` sessions as the chat endpoint would tokenize them."""
    return [ChatSession(s.arrival_s, [t.max_tokens for t in s.turns], s.think_s, dict(s.meta),
                        session=s, tokenizer=tokenizer) for s in sessions]


@dataclass(frozen=True)
class SimWorkload:
    """Sessions, when each starts, and what the simulated model generates (cyclically)."""

    sessions: list[SimSession]
    starts: list[float]
    filler: tuple[int, ...] = tuple(range(1000, 1000 + 4096))


class BlockTokens:
    """Deterministic token ids for trace block ids: equal ids give equal tokens, and
    different ids differ in their first two tokens (the id, in base TOKEN_SPAN digits).
    Built arithmetically, not cached: a full trace has about 10^8 prompt tokens."""

    def __init__(self, block_tokens: int = MOONCAKE_BLOCK_TOKENS):
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.block_tokens = block_tokens

    def __call__(self, block_id: int, n: int | None = None) -> list[int]:
        n = self.block_tokens if n is None else min(n, self.block_tokens)
        span = TOKEN_HIGH - TOKEN_LOW
        head = [TOKEN_LOW + block_id % span, TOKEN_LOW + (block_id // span) % span]
        start = TOKEN_LOW + (block_id * 7919) % (span - self.block_tokens)
        return (head + list(range(start, start + self.block_tokens - 2)))[:n]


@dataclass
class TraceBlockSession(SimSession):
    """A Mooncake row: its prompt is built when it is sent (traces are large)."""

    hash_ids: list[int] = field(default_factory=list)
    tail_tokens: int = 0
    blocks: BlockTokens | None = None

    def prompt(self, turn: int, replies: Sequence[list[int]]) -> list[int]:
        assert self.blocks is not None
        prompt: list[int] = []
        for h in self.hash_ids[:-1]:
            prompt += self.blocks(h)
        if self.hash_ids:
            prompt += self.blocks(self.hash_ids[-1], self.tail_tokens)
        return prompt


def mooncake_sessions(path: Path, limit: int | None = None, time_scale: float = 1.0,
                      length_scale: float = 1.0, max_output: int | None = None) -> list[SimSession]:
    """Mooncake rows (timestamp ms, input_length, output_length, hash_ids of 512-token
    blocks). `length_scale` < 1 shortens every block (and the outputs) by that factor."""
    per_block = max(1, int(MOONCAKE_BLOCK_TOKENS * length_scale))
    blocks = BlockTokens(per_block)
    out: list[SimSession] = []
    with path.open() as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            ids = row["hash_ids"]
            tail = row["input_length"] - MOONCAKE_BLOCK_TOKENS * (len(ids) - 1)
            n_out = max(1, int(row["output_length"] * length_scale))
            out.append(TraceBlockSession(row["timestamp"] / 1000.0 * time_scale,
                                         [min(n_out, max_output or n_out)], hash_ids=ids,
                                         tail_tokens=max(1, int(tail * length_scale)),
                                         blocks=blocks))
    return out


def azure_sessions(path: Path, limit: int | None = None, time_scale: float = 1.0,
                   length_scale: float = 1.0, max_output: int | None = None,
                   seed: int = 0) -> list[SimSession]:
    import csv
    from datetime import datetime

    rng = random.Random(seed)
    out: list[SimSession] = []
    t0: float | None = None
    with path.open() as f:
        for row in csv.DictReader(f):
            if limit is not None and len(out) >= limit:
                break
            ts = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            t0 = ts if t0 is None else t0
            n_in = max(1, int(int(row["ContextTokens"]) * length_scale))
            n_out = max(1, int(int(row["GeneratedTokens"]) * length_scale))
            prompt = [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n_in)]
            out.append(TokenSession((ts - t0) * time_scale,
                                    [min(n_out, max_output or n_out)], prompts=[prompt]))
    return out


def trace_sessions(path: Path, limit: int | None = None, time_scale: float = 1.0,
                   length_scale: float = 1.0, max_output: int | None = None,
                   seed: int = 0) -> list[SimSession]:
    if path.suffix == ".jsonl":
        return mooncake_sessions(path, limit, time_scale, length_scale, max_output)
    if path.suffix == ".csv":
        return azure_sessions(path, limit, time_scale, length_scale, max_output, seed)
    raise ValueError(f"unknown trace format {path.suffix!r}: expected .jsonl (Mooncake) "
                     "or .csv (Azure)")
