"""The synchronous engine core: add requests, step, abort. Single-threaded.

`LLMEngine.step()` schedules one batch, runs it, samples, detokenizes and returns one
RequestDelta per sequence that changed. A failure inside a step fails only the requests
in that batch (finish_reason "error"); the engine stays usable.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvmesh.config import EngineConfig
from kvmesh.engine.block_pool import BlockPool
from kvmesh.engine.detokenizer import IncrementalDetokenizer
from kvmesh.engine.kv_cache_manager import KVCacheManager
from kvmesh.engine.model_runner import BatchSeq, ModelRunner
from kvmesh.engine.request import Request
from kvmesh.engine.sampler import SamplingRow, sample
from kvmesh.engine.scheduler import Scheduler, SchedulerOutput
from kvmesh.engine.setup import LoadedModel, load_engine_model
from kvmesh.hashing import BlockKey, Namespace, make_namespace
from kvmesh.kvstore.store import TieredStore
from kvmesh.model.cpu_kernels import select_kernels
from kvmesh.types import FinishReason, Prompt, RequestDelta, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class SeqState:
    """Per-sequence engine state that the scheduler does not need."""

    parent_id: str
    index: int
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    pending_children: list[Request] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, progress: bool = True):
        self.config = config or EngineConfig()
        self.loaded: LoadedModel = load_engine_model(self.config, progress)
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = self.loaded.max_model_len
        cache = self.config.cache
        kernels = select_kernels(self.config.model.attention_backend, self.loaded.dtype,
                                 self.loaded.kv_dtype, self.loaded.device,
                                 self.loaded.model.arch.head_dim)
        self.runner = ModelRunner(self.loaded.model, self.loaded.num_blocks, cache.block_size,
                                  self.loaded.kv_dtype, self.loaded.device, *kernels)
        self.store = self._make_store()
        self._offloads: list[tuple[int, BlockKey]] = []
        offload = (lambda b, k: self._offloads.append((b, k))) if self.store else None
        self.pool = BlockPool(self.loaded.num_blocks, on_evict=offload,
                              on_cache=offload if self.config.tiers.write_through else None)
        self.kv = KVCacheManager(self.pool, cache.block_size, cache.enable_prefix_caching,
                                 external=self.store)
        self.scheduler = Scheduler(self.config.scheduler, self.kv, self.max_model_len)
        self._states: dict[str, SeqState] = {}
        self._children: dict[str, list[str]] = {}
        self._namespaces: dict[str | None, Namespace] = {}
        self.num_steps = 0

    def _make_store(self) -> TieredStore | None:
        tiers = self.config.tiers
        if not tiers.is_enabled or not self.config.cache.enable_prefix_caching:
            return None
        return TieredStore(tiers, self.runner.block_bytes, self.config.cache.block_size)

    def close(self) -> None:
        """Hand every cached device block down the tiers, then persist them (warm restart)."""
        if self.store is None:
            return
        self._flush_offloads()
        for block_id, key in self.pool.cached_blocks():
            self.store.offload(key, self.runner.block(block_id))
        self.store.close()

    # requests --------------------------------------------------------------------------

    def namespace(self, cache_salt: str | None) -> Namespace:
        if cache_salt not in self._namespaces:
            self._namespaces[cache_salt] = make_namespace(
                self.loaded.model_id,
                self.loaded.kv_dtype_name,
                f"block-major-v1:bs{self.config.cache.block_size}",
                cache_salt,
            )
        return self._namespaces[cache_salt]

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text is tokenized), validated."""
        ids = self._token_ids(prompt)
        self.validate_prompt(ids)
        return ids

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def validate_prompt(self, ids: Sequence[int], max_tokens: int | None = None) -> None:
        """Raise ValueError if the prompt cannot be served."""
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.loaded.model.arch.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but max_model_len is "
                f"{self.max_model_len} (prompt plus at least one output token)"
            )
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})"
            )

    def add_request(
        self,
        request_id: str | None,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request. Raises ValueError (bad input) or QueueFullError (overload)."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        ids = self._token_ids(prompt)
        self.validate_prompt(ids, params.max_tokens)
        if request_id in self._children:
            raise ValueError(f"request id {request_id!r} is already in use")
        children = [
            self._make_child(request_id, i, ids, params, priority, cache_salt, arrival_time)
            for i in range(params.n)
        ]
        self.scheduler.add_request(children[0])
        self._prefetch(children[0])
        self._children[request_id] = [c.request_id for c in children]
        self._states[children[0].request_id].pending_children = children[1:]
        return request_id

    def _prefetch(self, req: Request) -> None:
        """Start disk reads for the prefix blocks the device does not hold."""
        if self.store is None:
            return
        keys = req.update_block_keys(self.config.cache.block_size)
        limit = (req.num_tokens - 1) // self.config.cache.block_size
        first = next((i for i, k in enumerate(keys[:limit]) if self.pool.lookup(k) is None), limit)
        self.store.prefetch(keys[first:limit])

    def _make_child(
        self,
        parent: str,
        index: int,
        ids: list[int],
        params: SamplingParams,
        priority: int,
        salt: str | None,
        arrival: float | None,
    ) -> Request:
        child_id = parent if params.n == 1 else f"{parent}#{index}"
        seed = None if params.seed is None else params.seed + index
        gen = (
            torch.Generator(device=self.loaded.device).manual_seed(seed)
            if seed is not None
            else None
        )
        req = Request(
            child_id,
            list(ids),
            params,
            self.namespace(salt),
            arrival_time=time.monotonic() if arrival is None else arrival,
            priority=priority,
            eos_token_ids=self.loaded.eos_token_ids,
        )
        detok = IncrementalDetokenizer(
            self.tokenizer, params.stop, params.include_stop_str_in_output, ids
        )
        self._states[child_id] = SeqState(parent, index, detok, gen)
        return req

    def abort_request(self, request_id: str) -> list[RequestDelta]:
        """Abort a request (all its sequences). Returns their final deltas."""
        deltas = []
        for child_id in self._children.pop(request_id, []):
            state = self._states.pop(child_id, None)
            self.scheduler.abort_request(child_id)
            if state is not None:
                state.pending_children = []
                deltas.append(RequestDelta(request_id, state.index, (), "", "abort"))
        return deltas

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # stepping --------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        if self.store is not None:
            self._flush_offloads()  # blocks evicted since the last step become findable
            self.store.poll()
        out = self.scheduler.schedule()
        if out.is_empty:
            if self.store is not None and self.store.has_reads_in_flight():
                time.sleep(0.0005)  # only disk reads are pending: wait for them, briefly
            return []
        self.num_steps += 1
        now = time.monotonic()
        for seq in out.seqs:
            req = self.scheduler.requests[seq.request_id]
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                self._account_tiers(req)
        try:
            sampled, logprobs = self._execute(out)
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the engine
            log.exception("engine step failed")
            return self._fail(out, f"internal error: {type(exc).__name__}: {exc}")
        updated = self.scheduler.update_from_output(out, sampled)
        self._release_children(updated)
        return [self._delta(req, logprobs.get(req.request_id)) for req in updated]

    def _execute(self, out: SchedulerOutput):
        self._move_blocks(out)
        reqs = [self.scheduler.requests[s.request_id] for s in out.seqs]
        batch = [
            BatchSeq(
                r.token_ids[s.num_computed_tokens : s.num_computed_tokens + s.num_new_tokens],
                s.num_computed_tokens,
                self.kv.block_table(r.request_id),
                s.is_sampling,
            )
            for r, s in zip(reqs, out.seqs, strict=True)
        ]
        logits, positions = self.runner.execute(batch)
        chosen = [reqs[i] for i in positions]
        rows = [
            SamplingRow(
                r.params,
                r.prompt_token_ids,
                r.output_token_ids,
                self._states[r.request_id].generator,
            )
            for r in chosen
        ]
        tokens, logprobs = sample(logits, rows)
        ids = [r.request_id for r in chosen]
        return dict(zip(ids, tokens, strict=True)), dict(zip(ids, logprobs, strict=True))

    def _flush_offloads(self) -> None:
        assert self.store is not None
        for block_id, key in self._offloads:
            self.store.offload(key, self.runner.block(block_id))
        self._offloads.clear()

    def _account_tiers(self, req: Request) -> None:
        if self.store is None:
            return
        bs = self.config.cache.block_size
        device = ((req.num_cached_tokens or 0) - req.num_external_cached_tokens) // bs
        external = req.num_external_cached_tokens // bs
        wanted = (req.num_prompt_tokens - 1) // bs - device
        self.store.account(wanted, req.block_keys[device : device + external])

    def _move_blocks(self, out: SchedulerOutput) -> None:
        """Before the step writes any block: save evicted blocks, then copy in loaded ones."""
        if self.store is None:
            return
        self._flush_offloads()
        for block_id, key in out.loads:
            if not self.store.load(key, self.runner.block(block_id)):
                raise RuntimeError(f"host tier lost pinned block {key.hex()[:12]}")
        if out.loads and self.runner.device.type == "cuda":
            # The copies from pinned slots were asynchronous: finish them before those
            # slots can be reused (the stream is otherwise idle at the start of a step).
            torch.cuda.current_stream(self.runner.device).synchronize()

    def _delta(self, req: Request, logprobs) -> RequestDelta:
        state = self._states[req.request_id]
        text, stop = state.detok.add(req.token_ids[-1])
        if stop is not None:
            self.scheduler.finish_request(req, "stop", stop)
        finish: FinishReason | None = req.finish_reason
        if finish is not None:
            text += state.detok.flush()
            self._forget(req.request_id, state)
        return RequestDelta(
            state.parent_id,
            state.index,
            (req.token_ids[-1],),
            text,
            finish,
            req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens or 0,
            logprobs=(logprobs,) if logprobs is not None else None,
            queue_time_s=(req.first_scheduled_time or req.arrival_time) - req.arrival_time
            if req.num_output_tokens == 1
            else None,
        )

    def _forget(self, child_id: str, state: SeqState) -> None:
        self._states.pop(child_id, None)
        siblings = self._children.get(state.parent_id)
        if siblings is None:
            return
        if child_id in siblings:
            siblings.remove(child_id)
        if not siblings:
            del self._children[state.parent_id]

    def _release_children(self, updated: list[Request]) -> None:
        """Siblings of an n > 1 request start once the first has its prompt cached."""
        for req in updated:
            state = self._states.get(req.request_id)
            children = state.pending_children if state else []
            if children:
                state.pending_children = []  # type: ignore[union-attr]
                for child in children:
                    self.scheduler.add_request(child)

    def _fail(self, out: SchedulerOutput, message: str) -> list[RequestDelta]:
        deltas = []
        for seq in out.seqs:
            req = self.scheduler.requests.get(seq.request_id)
            state = self._states.get(seq.request_id)
            if req is None or state is None:
                continue
            self.scheduler.finish_request(req, "error")
            for child in state.pending_children:
                self._states.pop(child.request_id, None)
            self._forget(req.request_id, state)
            deltas.append(
                RequestDelta(
                    state.parent_id,
                    state.index,
                    (),
                    "",
                    "error",
                    num_prompt_tokens=req.num_prompt_tokens,
                    error=message,
                )
            )
        return deltas
