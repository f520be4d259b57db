"""LLMEngine: the synchronous engine, assembled. Single-threaded.

The data path runs one way: prompt -> input processor (tokenize, validate) -> core
(scheduler -> KV cache manager -> tiers) -> torch executor (block moves, model, sampler)
-> output processor (detokenize, stop strings, n > 1 fan-out) -> RequestDelta. A failure
inside a step fails only the requests in that batch (finish_reason "error"); the engine
stays usable.
"""

from __future__ import annotations

import logging
import uuid

from kvmesh.config import EngineConfig
from kvmesh.engine.core import EngineCore, ModelIdentity
from kvmesh.engine.draft_model import build_model_drafter
from kvmesh.engine.events import EventOutbox
from kvmesh.engine.executor import TorchExecutor
from kvmesh.engine.input_processor import InputProcessor
from kvmesh.engine.model_runner import ModelRunner
from kvmesh.engine.output_processor import OutputProcessor
from kvmesh.engine.prefault import Prefaulter
from kvmesh.engine.setup import LoadedModel, build_store, load_engine_model
from kvmesh.engine.structured import Grammars
from kvmesh.engine.warmup import warm_up
from kvmesh.model.cpu_kernels import select_kernels
from kvmesh.types import Prompt, RequestDelta, SamplingParams, TenantClass

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, progress: bool = True):
        self.config = config or EngineConfig()
        self.loaded: LoadedModel = load_engine_model(self.config, progress)
        loaded, cache = self.loaded, self.config.cache
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        kernels = select_kernels(self.config.model.attention_backend, loaded.dtype,
                                 loaded.kv_dtype, loaded.device, loaded.model.arch.head_dim)
        self.runner = ModelRunner(loaded.model, loaded.num_blocks, cache.block_size,
                                  loaded.kv_dtype, loaded.device, *kernels)
        outbox = EventOutbox()
        self.store = build_store(self.config, self.runner.block_bytes, outbox)
        identity = ModelIdentity(loaded.model_id, loaded.kv_dtype_name, loaded.max_model_len,
                                 loaded.eos_token_ids)
        drafter = (build_model_drafter(self.config, loaded, progress)
                   if self.config.scheduler.speculative_method == "draft" else None)
        self.core = EngineCore(self.config.scheduler, cache, identity, loaded.num_blocks,
                               self.store, self.config.tiers.write_through, outbox,
                               drafter=drafter)
        self.prefaulter = Prefaulter(self.runner.kv, self.core.pool, cache.prefault_bytes)
        if loaded.device.type == "cpu" and cache.prefault_bytes > 0:
            self.prefaulter.start()
        vocab = loaded.model.arch.vocab_size
        grammars = Grammars(self.tokenizer.to_json, vocab, loaded.eos_token_ids)
        self.executor = TorchExecutor(self.runner, self.store, grammars, loaded.eos_token_ids)
        self.inputs = InputProcessor(self.tokenizer, vocab, loaded.max_model_len, grammars)
        self.outputs = OutputProcessor(self.tokenizer)
        self.warmup_s = (warm_up(self.executor, cache.block_size, loaded.num_blocks,
                                 self.max_model_len, vocab)
                         if self.config.model.warmup else 0.0)

    @property
    def scheduler(self):  # noqa: ANN201 - views of the core, for metrics and tests
        return self.core.scheduler

    @property
    def kv(self):  # noqa: ANN201
        return self.core.kv

    @property
    def pool(self):  # noqa: ANN201
        return self.core.pool

    @property
    def num_steps(self) -> int:
        return self.core.num_steps

    def close(self) -> None:
        """Hand every cached device block down the tiers, then persist them (warm restart)."""
        self.prefaulter.stop()
        self.core.close(self.executor)

    # requests --------------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: Prompt,
                    params: SamplingParams | None = None, priority: int = 0,
                    cache_salt: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request. Raises ValueError (bad input) or QueueFullError (overload)."""
        params = params or SamplingParams()
        ids = self.inputs.process(prompt, params)
        return self.add_tokens(request_id, ids, params, priority, cache_salt, arrival_time)

    def add_tokens(self, request_id: str | None, ids: list[int], params: SamplingParams,
                   priority: int = 0, cache_salt: str | None = None,
                   arrival_time: float | None = None, tenant: TenantClass | None = None) -> str:
        """Queue a prompt the input processor already validated."""
        request_id = request_id or uuid.uuid4().hex
        seq_ids = self.core.add(request_id, ids, params, priority, cache_salt, arrival_time,
                                tenant)
        self.outputs.add(request_id, seq_ids, ids, params)
        return request_id

    def abort_request(self, request_id: str) -> list[RequestDelta]:
        """Abort a request (all its sequences). Returns their final deltas."""
        return self.outputs.abort(self.core.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestDelta]:
        updates = self.core.step(self.executor)
        if self.core.last_error is not None:
            log.error("engine step failed", exc_info=self.core.last_error)
            self.core.last_error = None
        return self.outputs.process(updates, self.core.finish)
