"""Cost models: how long a step, a block copy and a disk read take. Pure Python.

A step's cost depends on its batch only through `StepFeatures`. Two kinds:

- **linear** (fitted by `kvmesh profile` on the real engine, least squares with
  non-negative coefficients):

      step_s = c_const + c_seq * num_seqs + c_tok * num_tokens + c_samp * num_sampling
             + c_ctx * decode_ctx_tokens + c_pair * prefill_pair_ktokens
             + c_load * num_loads + c_store * num_stores + c_pre * num_prefill_seqs
             + c_kv * decode_kv_tokens + c_op * unfused_step
             + sum over FUSED_SEGMENTS (lo, hi] of c_lo_hi * clamp(fused_seqs - lo, 0, hi - lo)

  `decode_ctx_tokens` is the KV a decode step attends to (sum of context lengths of the
  one-token sequences); `decode_kv_tokens` is the distinct KV among it: a full block
  that several sequences share (a cached prefix) counts once. Attention's arithmetic
  grows with the first, the bytes fetched from memory with the second (a shared block is
  still in cache when the next sequence reads it); `prefill_pair_ktokens` is attention's
  quadratic work, the sum over prefill chunks of n * (start + (n + 1) / 2), in thousands;
  `num_prefill_seqs` prices the fixed work of each prefill chunk (its attention metadata
  and kernel calls); `unfused_step` (1 or 0) the fixed work of the engine's op-by-op
  path. The CPU engine runs a decode step of up to `fused_rows` sequences as one native
  call per layer, and any other step (a prefill chunk, more sequences) op by op: some
  30 ms more on the default model, whatever the chunk's size. A fused step's cost is
  piecewise linear in its sequences (`fused_seqs`: 0 for an unfused step): kernels
  change with the row count (AMX tiles of 16 rows; other kernels for 1-2 rows). Each
  segment's coefficient is a non-negative slope on top of the per-sequence and
  per-token ones that every step shares.

- **roofline** (a named GPU and model shape; no measurement):

      step_s = overhead_s + max(flops / (tflops * mfu), bytes / (hbm * mbu))
             + (num_loads + num_stores) * block_bytes / pcie

  flops = 2 * params * num_tokens (the lm_head only for sampled tokens)
        + 4 * layers * heads * head_dim * (decode_ctx_tokens + 1000 * prefill_pair_ktokens)
  bytes = weight bytes + kv_bytes_per_token * (decode_ctx_tokens + prefill KV read)

  (the roofline reads a shared block once per sequence, as a paged kernel does from HBM)

Tier costs (both kinds): a disk read of one block takes `disk_read_s` on one of
`disk_io_threads` workers; `request_overhead_s` is the time from a client's send to the
engine queue (HTTP, tokenizing), `token_overhead_s` from a step's end to the client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvmesh.engine.batch import ExecuteBatch
from kvmesh.sim.shapes import GpuSpec, ModelShape, gpu, model_shape

NO_FUSED_LIMIT = 1 << 30  # `fused_rows` of an engine whose every decode step is fused
# A fused decode step's cost against its sequences, piecewise linear: the extra slope of
# each segment (lo, hi] of the count (the first sequence is in `const`). decode_run_s
# spells out one term per segment.
FUSED_SEGMENTS = ((1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, NO_FUSED_LIMIT))
FEATURES = ("const", "num_seqs", "num_tokens", "num_sampling", "decode_ctx_tokens",
            "prefill_pair_ktokens", "num_loads", "num_stores", "num_prefill_seqs",
            "decode_kv_tokens", "unfused_step",
            *(f"fused_seqs_{lo}_{hi}" if hi < NO_FUSED_LIMIT else f"fused_seqs_{lo}_up"
              for lo, hi in FUSED_SEGMENTS))


@dataclass(frozen=True, slots=True)
class StepFeatures:
    num_seqs: int = 0
    num_tokens: int = 0
    num_sampling: int = 0
    decode_ctx_tokens: int = 0
    prefill_pair_ktokens: float = 0.0
    prefill_kv_tokens: int = 0  # KV a prefill chunk reads: start + n per chunk
    num_loads: int = 0
    num_stores: int = 0
    block_size: int = 16
    num_prefill_seqs: int = 0  # sequences feeding more than one token (prefill chunks)
    # decode context in full blocks that an earlier sequence of the step reads too
    decode_shared_tokens: int = 0

    @property
    def decode_kv_tokens(self) -> int:
        """Distinct decode KV: each shared block once."""
        return self.decode_ctx_tokens - self.decode_shared_tokens

    def is_unfused(self, fused_rows: int) -> bool:
        """Whether the engine runs this step op by op: a prefill chunk, or more
        sequences than its fused decode path takes."""
        return bool(self.num_prefill_seqs) or self.num_seqs > fused_rows

    def vector(self, fused_rows: int = NO_FUSED_LIMIT) -> list[float]:
        """Values in `FEATURES` order (const is 1 for a batch that runs the model)."""
        unfused = self.is_unfused(fused_rows)
        return [1.0 if self.num_seqs else 0.0, self.num_seqs, self.num_tokens,
                self.num_sampling, self.decode_ctx_tokens, self.prefill_pair_ktokens,
                self.num_loads, self.num_stores, self.num_prefill_seqs,
                self.decode_kv_tokens, 1.0 if unfused else 0.0,
                *self.fused_segments(unfused)]

    def fused_segments(self, unfused: bool) -> list[float]:
        """How many of a fused step's sequences fall in each of `FUSED_SEGMENTS`."""
        s = 0 if unfused else self.num_seqs
        return [float(min(max(s - lo, 0), hi - lo)) for lo, hi in FUSED_SEGMENTS]


def step_features(batch: ExecuteBatch, block_size: int) -> StepFeatures:
    tokens = sampling = ctx = kv = prefills = repeats = 0
    pairs = 0.0
    seen: set[int] = set()  # full decode blocks read so far this step
    for seq in batch.seqs:
        n = len(seq.token_ids)
        tokens += n
        sampling += seq.is_sampling
        if n == 1:
            ctx += seq.start + 1
            full = (seq.start + 1) // block_size
            if full:
                before = len(seen)
                seen.update(seq.block_table[:full])
                repeats += full - (len(seen) - before)
        else:
            pairs += n * (seq.start + (n + 1) / 2)
            kv += seq.start + n
            prefills += 1
    return StepFeatures(len(batch.seqs), tokens, sampling, ctx, pairs / 1000.0, kv,
                        len(batch.loads), len(batch.stores), block_size, prefills,
                        repeats * block_size)


@dataclass(frozen=True)
class TierCosts:
    disk_read_s: float = 0.0005  # one block, on one I/O worker
    disk_io_threads: int = 4
    request_overhead_s: float = 0.0
    token_overhead_s: float = 0.0


class CostModel(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def shape(self) -> ModelShape: ...
    @property
    def kv_dtype_bytes(self) -> int: ...
    @property
    def tiers(self) -> TierCosts: ...

    def step_s(self, f: StepFeatures) -> float: ...
    def decode_run_s(self, f: StepFeatures, num_steps: int,
                     stores: Sequence[int]) -> list[float]: ...
    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LinearCostModel:
    shape: ModelShape
    coefficients: dict[str, float]
    kv_dtype_bytes: int = 4
    tiers: TierCosts = field(default_factory=TierCosts)
    fit: dict[str, Any] = field(default_factory=dict)  # error figures, samples, machine
    fused_rows: int = NO_FUSED_LIMIT  # most decode sequences of a fused step
    kind: str = "linear"

    def __post_init__(self) -> None:
        unknown = set(self.coefficients) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown cost-model features {sorted(unknown)}")
        negative = sorted(n for n, c in self.coefficients.items() if c < 0)
        if negative:  # no feature makes a step faster (decode runs rely on it)
            raise ValueError(f"cost-model coefficients must be >= 0: {negative}")
        object.__setattr__(self, "_coef", [float(self.coefficients.get(n, 0.0))
                                           for n in FEATURES])

    def step_s(self, f: StepFeatures) -> float:
        coef: list[float] = self._coef  # type: ignore[attr-defined]
        total = 0.0  # left to right (not sum(), which compensates on 3.12+): see decode_run_s
        for c, x in zip(coef, f.vector(self.fused_rows), strict=True):
            total += c * x
        return total

    def decode_run_s(self, f: StepFeatures, num_steps: int,
                     stores: Sequence[int]) -> list[float]:
        """`step_s` of `num_steps` decode steps from `f` (no stores of its own): each
        reads one more token of context per sequence, step j saves `stores[j]` blocks."""
        coef: list[float] = self._coef  # type: ignore[attr-defined]
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10 = coef[:11]
        x0 = 1.0 if f.num_seqs else 0.0
        s, ctx, growth = f.num_seqs, f.decode_ctx_tokens, f.num_seqs
        kv = f.decode_kv_tokens  # new tokens land in each sequence's own tail block
        unfused = f.is_unfused(self.fused_rows)
        x10 = 1.0 if unfused else 0.0
        e0, e1, e2, e3, e4, e5 = (c * x for c, x in zip(coef[11:], f.fused_segments(unfused),
                                                        strict=True))
        # The same sum, in the same order, as `step_s`: bit-identical to stepping.
        return [0.0 + c0 * x0 + c1 * s + c2 * f.num_tokens + c3 * f.num_sampling
                + c4 * (ctx + growth * j) + c5 * f.prefill_pair_ktokens + c6 * 0
                + c7 * stores[j] + c8 * f.num_prefill_seqs + c9 * (kv + growth * j)
                + c10 * x10 + e0 + e1 + e2 + e3 + e4 + e5 for j in range(num_steps)]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": self.shape.to_json(),
                "coefficients": dict(self.coefficients), "kv_dtype_bytes": self.kv_dtype_bytes,
                "tiers": asdict(self.tiers), "fit": self.fit, "fused_rows": self.fused_rows}


@dataclass(frozen=True)
class RooflineCostModel:
    gpu: GpuSpec
    shape: ModelShape
    mfu: float = 0.6  # fraction of peak FLOP/s a step reaches
    mbu: float = 0.8  # fraction of peak HBM bandwidth
    overhead_s: float = 0.0003  # per step: launch and scheduling
    weight_bytes_per_param: float = 2.0
    kv_dtype_bytes: int = 2
    tiers: TierCosts = field(default_factory=lambda: TierCosts(disk_read_s=0.0002,
                                                               disk_io_threads=16))
    kind: str = "roofline"

    def __post_init__(self) -> None:
        if not (0 < self.mfu <= 1 and 0 < self.mbu <= 1):
            raise ValueError("mfu and mbu must be in (0, 1]")
        s = self.shape
        embed = s.hidden_size * s.vocab_size
        consts = {  # per-step constants of the formulas below, computed once
            "_embed": embed, "_body": s.num_params - embed,
            "_attn": 4 * s.num_layers * s.num_heads * s.head_dim,
            "_kv": s.kv_bytes_per_token(self.kv_dtype_bytes),
            "_weights": s.num_params * self.weight_bytes_per_param,
            "_flops_rate": self.gpu.bf16_tflops * 1e12 * self.mfu,
            "_bytes_rate": self.gpu.hbm_gbps * 1e9 * self.mbu,
        }
        for name, value in consts.items():
            object.__setattr__(self, name, value)

    @property
    def block_copy_s_per_token(self) -> float:
        return self.shape.kv_bytes_per_token(self.kv_dtype_bytes) / (self.gpu.pcie_gbps * 1e9)

    def step_s(self, f: StepFeatures) -> float:
        c: Any = self
        copy_s = (f.num_loads + f.num_stores) * f.block_size * self.block_copy_s_per_token
        if not f.num_seqs:
            return copy_s
        flops = (2 * c._body * f.num_tokens + 2 * c._embed * f.num_sampling
                 + c._attn * (f.decode_ctx_tokens + 1000 * f.prefill_pair_ktokens))
        data = c._weights + c._kv * (f.decode_ctx_tokens + f.prefill_kv_tokens)
        return copy_s + self.overhead_s + max(flops / c._flops_rate, data / c._bytes_rate)

    def decode_run_s(self, f: StepFeatures, num_steps: int,
                     stores: Sequence[int]) -> list[float]:
        """`step_s` of `num_steps` decode steps from `f` (see LinearCostModel)."""
        c: Any = self
        flops0 = (2 * c._body * f.num_tokens + 2 * c._embed * f.num_sampling
                  + c._attn * (f.decode_ctx_tokens + 1000 * f.prefill_pair_ktokens))
        data0 = c._weights + c._kv * (f.decode_ctx_tokens + f.prefill_kv_tokens)
        dflops, ddata = c._attn * f.num_seqs, c._kv * f.num_seqs
        bs, pt = f.block_size, self.block_copy_s_per_token
        fr, br, over = c._flops_rate, c._bytes_rate, self.overhead_s
        # The same operations, in the same order, as `step_s`: bit-identical to stepping.
        return [(0 + stores[j]) * bs * pt + over + max((flops0 + dflops * j) / fr,
                                                       (data0 + ddata * j) / br)
                for j in range(num_steps)]

    def kv_capacity_bytes(self, utilization: float = 0.9) -> int:
        """Device memory left for KV after the weights."""
        total = self.gpu.memory_gib * 2**30 * utilization
        return max(0, int(total - self.shape.num_params * self.weight_bytes_per_param))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "gpu": self.gpu.name, "shape": self.shape.to_json(),
                "mfu": self.mfu, "mbu": self.mbu, "overhead_s": self.overhead_s,
                "weight_bytes_per_param": self.weight_bytes_per_param,
                "kv_dtype_bytes": self.kv_dtype_bytes, "tiers": asdict(self.tiers)}


def roofline(gpu_name: str, model_name: str, **kwargs: Any) -> RooflineCostModel:
    return RooflineCostModel(gpu(gpu_name), model_shape(model_name), **kwargs)


def from_json(doc: dict[str, Any]) -> CostModel:
    kind = doc.get("kind")
    tiers = TierCosts(**doc.get("tiers", {}))
    shape = ModelShape(**doc["shape"])
    if kind == "linear":
        return LinearCostModel(shape, doc["coefficients"], doc.get("kv_dtype_bytes", 4), tiers,
                               doc.get("fit", {}), doc.get("fused_rows", NO_FUSED_LIMIT))
    if kind == "roofline":
        return RooflineCostModel(gpu(doc["gpu"]), shape, doc.get("mfu", 0.6),
                                 doc.get("mbu", 0.8), doc.get("overhead_s", 0.0003),
                                 doc.get("weight_bytes_per_param", 2.0),
                                 doc.get("kv_dtype_bytes", 2), tiers)
    raise ValueError(f"unknown cost model kind {kind!r}: expected linear or roofline")


def load(spec: str) -> CostModel:
    """A cost model from a JSON file (`kvmesh profile`), or `roofline:GPU:MODEL`."""
    if spec.startswith("roofline:"):
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"bad cost model {spec!r}: use roofline:GPU:MODEL")
        return roofline(parts[1], parts[2])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"cost model {spec!r} is neither a file nor roofline:GPU:MODEL")
    try:
        return from_json(json.loads(path.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a cost model ({exc})") from exc


def save(model: CostModel, path: Path) -> None:
    """Indented JSON, each list of numbers (a profile's step sample) on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(model.to_json(), indent=2)
    text = _NUMBER_LIST.sub(lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    path.write_text(text + "\n")


# a list of numbers as json.dumps(indent=...) writes one: "[" then a newline (a string
# value never holds a raw newline), numbers one per line, "]"
_NUMBER_LIST = re.compile(r"\[\n\s*([-+0-9.eE,\s]+?)\n\s*\]")
