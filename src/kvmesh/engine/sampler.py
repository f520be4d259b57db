"""Batched sampling: penalties, temperature, top-k/top-p/min-p, per-request seeds, logprobs.

Rows are requests. Greedy rows take the argmax of the (penalised) logits; other rows draw
with the exponential-race trick, which lets a seeded request use its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmesh.types import SamplingParams, TokenLogprobs


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        vocab = logits.shape[1]
        out = torch.tensor(row.output_ids, dtype=torch.long, device=logits.device)
        counts = torch.zeros(vocab, device=logits.device).index_add_(
            0, out, torch.ones(len(row.output_ids), device=logits.device)
        )
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(row.prompt_ids, dtype=torch.long, device=logits.device)] = True
            x = logits[i]
            penalised = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            logits[i] = torch.where(seen, penalised, x)
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Mask out what top-k, top-p and min-p exclude; `logits` is one temperature-scaled row."""
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def _logprobs(raw: torch.Tensor, tokens: list[int], rows: list[SamplingRow]):
    wanted = [r.params.logprobs for r in rows]
    if all(n is None for n in wanted):
        return [None] * len(rows)
    logp = raw.log_softmax(-1)
    result: list[TokenLogprobs | None] = []
    for i, n in enumerate(wanted):
        if n is None:
            result.append(None)
            continue
        entry = {tokens[i]: float(logp[i, tokens[i]])}
        if n:
            top = torch.topk(logp[i], n)
            for value, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                entry.setdefault(token, value)
        result.append(entry)
    return result


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    """Pick one token per row. Returns (tokens, logprobs per row or None)."""
    raw = logits
    if any(r.params.has_penalties for r in rows):
        logits = logits.clone()
        _apply_penalties(logits, rows)
    tokens = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        p = row.params
        if p.is_greedy:
            continue
        scaled = _filter(logits[i] / p.temperature, p)
        tokens[i] = _draw(scaled.softmax(-1), row.generator)
    return tokens, _logprobs(raw, tokens, rows)
