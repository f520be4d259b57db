"""Batched sampling: penalties, logit bias, grammar masks, temperature, top-k/top-p/min-p,
per-request seeds, logprobs.

Rows are requests. Greedy rows take the argmax of the (penalised, biased, masked) logits;
other rows draw with the exponential-race trick, which lets a seeded request use its own
generator. A batch mixes constrained and free rows: a free row's logits are never touched.
Logprobs are those of the model's raw distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.types import SamplingParams, TokenLogprobs


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    allowed: np.ndarray | None = None  # grammar bitmask: int32 words, bit i = token i


def _refused(masks: list[np.ndarray], vocab: int) -> torch.Tensor:
    """(rows, vocab) bool: True where a row's grammar refuses the token."""
    bits = np.unpackbits(np.stack(masks).view(np.uint8), axis=1, bitorder="little")
    refused = np.ones((len(masks), vocab), dtype=np.bool_)
    width = min(vocab, bits.shape[1])
    refused[:, :width] = bits[:, :width] == 0
    return torch.from_numpy(refused)


def _apply_bias_and_masks(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        for token, bias in row.params.logit_bias:
            if token < vocab:  # -100 bans the token outright, as OpenAI documents
                logits[i, token] = float("-inf") if bias <= -100.0 else logits[i, token] + bias
    masked = [i for i, row in enumerate(rows) if row.allowed is not None]
    if not masked:
        return
    refused = _refused([rows[i].allowed for i in masked], vocab).to(logits.device)  # type: ignore[misc]
    if len(masked) == len(rows):
        logits.masked_fill_(refused, float("-inf"))
        return
    for j, i in enumerate(masked):
        logits[i].masked_fill_(refused[j], float("-inf"))


def _needs_edit(row: SamplingRow) -> bool:
    p = row.params
    return p.has_penalties or bool(p.logit_bias) or row.allowed is not None


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


def _argmax(logits: torch.Tensor) -> list[int]:
    """Each row's first maximum (numpy's argmax on a CPU: several times faster than
    torch's for a batch of vocabulary-wide rows; the same first-maximum rule)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


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
    if any(_needs_edit(r) for r in rows):
        logits = logits.clone()
        _apply_penalties(logits, rows)
        _apply_bias_and_masks(logits, rows)
    tokens = _argmax(logits)
    for i, row in enumerate(rows):
        p = row.params
        if p.is_greedy:
            continue
        scaled = _filter(logits[i] / p.temperature, p)
        tokens[i] = _draw(scaled.softmax(-1), row.generator)
    return tokens, _logprobs(raw, tokens, rows)


def verify_draft(logits: torch.Tensor, draft: list[int], p: SamplingParams,
                 generator: torch.Generator | None) -> list[int]:
    """Speculative verification: `logits` has one row per drafted position plus one.
    Greedy keeps the draft while it equals the argmax, then takes the argmax: exactly
    the tokens plain decoding would give. Sampled uses rejection sampling against the
    draft (a point mass): accept token d with probability p(d); on rejection draw from p
    without d; so each token follows the same distribution as without a draft."""
    if p.is_greedy:
        best = _argmax(logits)
        n = 0
        while n < len(draft) and best[n] == draft[n]:
            n += 1
        return [*draft[:n], best[n]]
    out: list[int] = []
    for j, token in enumerate(draft):
        probs = _filter(logits[j] / p.temperature, p).softmax(-1)
        u = float(torch.rand((), generator=generator, device=probs.device))
        if u < float(probs[token]):
            out.append(token)
            continue
        probs[token] = 0.0
        out.append(_draw(probs / probs.sum(), generator))
        return out
    last = _filter(logits[len(draft)] / p.temperature, p).softmax(-1)
    return [*out, _draw(last, generator)]
