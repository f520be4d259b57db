"""Paged attention over the block-major KV cache, with torch SDPA (CPU and CUDA).

The cache is one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim];
each layer sees strided views `k_cache`, `v_cache` of shape [num_blocks, block_size, H, D].
A batch holds decode tokens first (one per sequence), then prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class DecodeKernel(Protocol):
    """Decode attention reading K/V blocks in place (see model/cpu_kernels.py)."""

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor: ...


class PrefillKernel(Protocol):
    """Causal prefill attention reading K/V blocks in place (see model/cpu_kernels.py)."""

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, segments: torch.Tensor, out: torch.Tensor,
                 scale: float) -> None: ...


@dataclass
class PrefillBatch:
    """Every prefill chunk of a step, for one prefill-kernel call per layer."""

    tables: torch.Tensor  # [segments, max_blocks] long
    segments: torch.Tensor  # [segments, 3] long: first token in the batch, length, context


@dataclass
class PrefillSegment:
    start: int  # first token of the chunk in the flat batch
    length: int  # tokens in the chunk
    context_len: int  # tokens attended to: cached prefix + this chunk
    block_table: torch.Tensor  # [num_blocks] long, covering context_len


@dataclass
class DecodeGroup:
    """Decode tokens of similar context length, padded to a common width."""

    start: int  # first token of the group in the flat batch
    count: int
    block_tables: torch.Tensor  # [count, max_blocks]
    mask: torch.Tensor | None  # [count, 1, 1, max_blocks * block_size] bool; None: no padding
    lengths: torch.Tensor  # [count] long: context length of each sequence


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block id of each new token
    slot_offsets: torch.Tensor  # [T] offset within the block
    num_decodes: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSegment]  # empty when prefill_batch carries them to the kernel
    decode_kernel: DecodeKernel | None = None  # None: gather + SDPA
    prefill_kernel: PrefillKernel | None = None  # None: SDPA per chunk
    prefill_batch: PrefillBatch | None = None  # set with prefill_kernel


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int, dtype: torch.dtype):
    """[H, length, D] keys or values of one sequence."""
    return cache[table].flatten(0, 1)[:length].transpose(0, 1).to(dtype)


def _decode(q, k_cache, v_cache, group: DecodeGroup, scale: float,
            kernel: DecodeKernel | None = None) -> torch.Tensor:
    if kernel is not None:
        return kernel(q, k_cache, v_cache, group.block_tables, group.lengths, scale)
    num, num_q_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    tables = group.block_tables
    keys = k_cache[tables].flatten(1, 2).transpose(1, 2).to(q.dtype)  # [S, H, T, D]
    values = v_cache[tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
    # Queries sharing a KV head are laid out as that head's query rows (GQA without copies).
    grouped = q.view(num, num_kv, num_q_heads // num_kv, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=group.mask, scale=scale)
    return out.reshape(num, num_q_heads, head_dim)


def _prefill(q, k, v, k_cache, v_cache, seg: PrefillSegment, scale: float) -> torch.Tensor:
    sl = slice(seg.start, seg.start + seg.length)
    query = q[sl].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
    if seg.context_len == seg.length:
        keys = k[sl].transpose(0, 1).unsqueeze(0)
        values = v[sl].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        keys = _gather(k_cache, seg.block_table, seg.context_len, q.dtype).unsqueeze(0)
        values = _gather(v_cache, seg.block_table, seg.context_len, q.dtype).unsqueeze(0)
        offset = seg.context_len - seg.length
        rows = torch.arange(seg.length, device=q.device).unsqueeze(1) + offset
        mask = torch.arange(seg.context_len, device=q.device).unsqueeze(0) <= rows
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out.squeeze(0).transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this batch's K/V into the cache, then attend. q: [T, Hq, D]; k, v: [T, H, D]."""
    k_cache[meta.slot_blocks, meta.slot_offsets] = k.to(k_cache.dtype)
    v_cache[meta.slot_blocks, meta.slot_offsets] = v.to(v_cache.dtype)
    if not meta.prefills and meta.prefill_batch is None and len(meta.decode_groups) == 1:
        return _decode(q, k_cache, v_cache, meta.decode_groups[0], scale, meta.decode_kernel)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for g in meta.decode_groups:
        sl = slice(g.start, g.start + g.count)
        out[sl] = _decode(q[sl], k_cache, v_cache, g, scale, meta.decode_kernel)
    batch = meta.prefill_batch
    if meta.prefill_kernel is not None and batch is not None:
        meta.prefill_kernel(q, k_cache, v_cache, batch.tables, batch.segments, out, scale)
        return out
    for seg in meta.prefills:
        out[seg.start : seg.start + seg.length] = _prefill(q, k, v, k_cache, v_cache, seg, scale)
    return out
