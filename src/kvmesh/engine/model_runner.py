"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

Owns the device KV tensor [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]:
block-major, so one block (all layers' K and V) is one contiguous slab.
Runs on the engine thread only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from kvmesh.engine.batch import SeqWork
from kvmesh.model.arch import ModelArch
from kvmesh.model.attention import (
    AttentionMetadata,
    DecodeGroup,
    DecodeKernel,
    PrefillBatch,
    PrefillKernel,
    PrefillSegment,
)
from kvmesh.model.llama import LlamaForCausalLM

PAGE = 4096


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros. On the CPU, from calloc: the kernel's zero pages are mapped on first touch, so
    a multi-GiB pool costs nothing at startup (torch.zeros writes every page: ~1.5 s/GiB
    on a VM). The cost moves to each block's first use, which `engine.prefault` takes off
    the request path by mapping pages just ahead of the blocks in use, in the background;
    resident memory grows until the pool's free list has cycled once (then it is the
    whole pool, as before)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + PAGE, dtype=np.uint8)
    skip = -raw.ctypes.data % PAGE  # page-aligned, so no vector load splits a cache line
    return torch.from_numpy(raw[skip:skip + nbytes]).view(dtype).view(shape)


def kv_block_bytes(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return arch.num_layers * 2 * block_size * arch.kv_dim * elem


def _expand_drafts(seqs: Sequence[SeqWork]) -> tuple[Sequence[SeqWork], list[int]]:
    """A sequence with a draft becomes 1 + num_spec one-token decode rows at consecutive
    positions over the same block table: every row's K and V is written before attention
    runs, so each row attends to the rows before it, as a decode step would. Verifying a
    draft then takes the decode path (the fused native kernel where there is one), not
    the prefill path. Returns the rows and each row's original sequence index."""
    if not any(s.num_spec for s in seqs):
        return seqs, list(range(len(seqs)))
    rows: list[SeqWork] = []
    owner: list[int] = []
    for i, s in enumerate(seqs):
        if not s.num_spec:
            rows.append(s)
            owner.append(i)
            continue
        for j, token in enumerate(s.token_ids):
            rows.append(replace(s, token_ids=[token], start=s.start + j, num_spec=0))
            owner.append(i)
    return rows, owner


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        decode_kernel: DecodeKernel | None = None,
        prefill_kernel: PrefillKernel | None = None,
    ):
        arch = model.arch
        self.model = model
        self.decode_kernel = decode_kernel
        self.prefill_kernel = prefill_kernel
        self.device = device
        self.block_size = block_size
        shape = (num_blocks, arch.num_layers, 2, block_size, arch.num_kv_heads, arch.head_dim)
        # Zeros, not empty: padded decode slots read unused blocks under a mask, and
        # uninitialised NaNs would leak through the softmax.
        self.kv = lazy_zeros(shape, kv_dtype, device)
        self.block_bytes = self.kv[0].numel() * self.kv.element_size()
        self.kv_caches = [(self.kv[:, i, 0], self.kv[:, i, 1]) for i in range(arch.num_layers)]

    def block(self, block_id: int) -> torch.Tensor:
        """One block's slab (all layers' K and V): contiguous, so one copy moves it."""
        return self.kv[block_id]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slots(self, seqs: Sequence[SeqWork]) -> tuple[list[int], list[int], list[int], list[int]]:
        ids: list[int] = []
        positions: list[int] = []
        blocks: list[int] = []
        offsets: list[int] = []
        bs = self.block_size
        for s in seqs:
            ids.extend(s.token_ids)
            pos = range(s.start, s.start + len(s.token_ids))
            positions.extend(pos)
            blocks.extend(s.block_table[p // bs] for p in pos)
            offsets.extend(p % bs for p in pos)
        return ids, positions, blocks, offsets

    def _decode_group(self, decodes: Sequence[SeqWork], start: int) -> DecodeGroup:
        bs = self.block_size
        lengths = [s.start + 1 for s in decodes]
        width = -(-max(lengths) // bs)
        tables = [
            s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in decodes
        ]
        table = self._tensor([b for t in tables for b in t]).view(len(decodes), width)
        lens = self._tensor(lengths)
        if self.decode_kernel is not None or all(n == width * bs for n in lengths):
            return DecodeGroup(start, len(decodes), table, None, lens)
        span = torch.arange(width * bs, device=self.device)
        mask = span.unsqueeze(0) < lens.unsqueeze(1)
        return DecodeGroup(start, len(decodes), table, mask[:, None, None, :], lens)

    def _decode_groups(self, decodes: Sequence[SeqWork]) -> list[DecodeGroup]:
        """Split decodes (sorted by length) where padding would more than double the work.

        The native kernel reads each sequence's own length, so it takes one group."""
        if self.decode_kernel is not None:
            return [self._decode_group(decodes, 0)] if decodes else []
        groups: list[DecodeGroup] = []
        begin = 0
        for i in range(1, len(decodes) + 1):
            if i == len(decodes) or decodes[i].start + 1 > 2 * (decodes[begin].start + 1) + 64:
                groups.append(self._decode_group(decodes[begin:i], begin))
                begin = i
        return groups

    def _prefill_meta(self, prefills: Sequence[SeqWork], first: int) -> list[PrefillSegment]:
        segments = []
        start = first
        for s in prefills:
            context = s.start + len(s.token_ids)
            table = self._tensor(s.block_table[: -(-context // self.block_size)])
            segments.append(PrefillSegment(start, len(s.token_ids), context, table))
            start += len(s.token_ids)
        return segments

    def _prefill_batch(self, prefills: Sequence[SeqWork], first: int) -> PrefillBatch | None:
        if self.prefill_kernel is None or not prefills:
            return None
        rows: list[int] = []
        tables: list[list[int]] = []
        start = first
        for s in prefills:
            context = s.start + len(s.token_ids)
            rows.extend((start, len(s.token_ids), context))
            tables.append(s.block_table[: -(-context // self.block_size)])
            start += len(s.token_ids)
        width = max(len(t) for t in tables)
        flat = [b for t in tables for b in t + [0] * (width - len(t))]
        return PrefillBatch(self._tensor(flat).view(len(prefills), width),
                            self._tensor(rows).view(len(prefills), 3))

    def execute(self, seqs: Sequence[SeqWork]) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns logits for the sampling sequences and their batch indices
        (a sequence with a draft has 1 + num_spec consecutive rows)."""
        seqs, owner = _expand_drafts(seqs)
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].token_ids) > 1, seqs[i].start))
        ordered = [seqs[i] for i in order]
        decodes = [s for s in ordered if len(s.token_ids) == 1]
        prefills = ordered[len(decodes) :]
        ids, positions, blocks, offsets = self._slots(ordered)
        batch = self._prefill_batch(prefills, len(decodes))
        meta = AttentionMetadata(
            slot_blocks=self._tensor(blocks),
            slot_offsets=self._tensor(offsets),
            num_decodes=len(decodes),
            decode_groups=self._decode_groups(decodes),
            prefills=[] if batch else self._prefill_meta(prefills, len(decodes)),
            decode_kernel=self.decode_kernel,
            prefill_kernel=self.prefill_kernel,
            prefill_batch=batch,
        )
        ends: list[int] = []
        sampled: list[int] = []
        cursor = 0
        for slot, s in zip(order, ordered, strict=True):
            cursor += len(s.token_ids)
            if s.is_sampling:
                ends.append(cursor - 1)
                sampled.append(owner[slot])
        logits = self.model(
            self._tensor(ids), self._tensor(positions), meta, self.kv_caches, self._tensor(ends)
        )
        if len(owner) > len(set(owner)):  # a draft's rows next to each other, in order
            rows = sorted(range(len(sampled)), key=lambda r: sampled[r])
            logits, sampled = logits[rows], [sampled[r] for r in rows]
        return logits, sampled
