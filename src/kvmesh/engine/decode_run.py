"""Decode runs: several plain decode steps decided at once, the simulator's fast path.
Pure: no torch, no I/O.

`DecodeRuns` is a part of `Scheduler` (a mixin): when every running request decodes one
token per step with nothing else to decide, `EngineCore.step_decode_run` asks how many
such steps are certain (`decode_run_length`), in what order their blocks are allocated
and filled (`decode_run_events`), and then applies them at once (`advance_decode`,
`finish_decode_run`), in the same order and with the same results as step by step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmesh.config import SchedulerConfig
from kvmesh.engine.kv_cache_manager import KVCacheManager
from kvmesh.engine.policies import UsageAware
from kvmesh.engine.request import Request

if TYPE_CHECKING:
    from kvmesh.engine.schedule import SchedulerOutput

ALLOCATE, FILL = 0, 1  # a decode run's block events, in this order within a step


class DecodeRuns:
    # the scheduler's state and helpers that a run reads
    config: SchedulerConfig
    kv: KVCacheManager
    max_model_len: int
    running: list[Request]
    waiting: list[Request]
    requests: dict[str, Request]
    _usage: UsageAware | None

    def _key(self, req: Request) -> tuple[float, ...]:
        raise NotImplementedError

    def _check_stop(self, req: Request, token: int) -> None:
        raise NotImplementedError

    def decode_run_length(self, max_steps: int) -> int:
        """How many coming steps would each schedule exactly every running request for one
        decode token, with nothing else to decide, as `schedule()` would: nobody waiting,
        every running request decoding, none that could stop before the last of them (no
        EOS, stop token or stop string checks, a length cap at least that far) and free
        blocks for all (no preemption). 0 if the next step is anything else."""
        running = self.running
        if self.waiting or not running or len(running) > self.config.max_num_batched_tokens:
            return 0
        k = max_steps
        for req in running:
            p = req.params
            if req.num_pending_tokens != 1 or p.stop or p.stop_token_ids or p.n != 1 or (
                    req.eos_token_ids and not p.ignore_eos) or p.max_tokens is None:
                return 0
            k = min(k, p.max_tokens - req.num_output_tokens,
                    self.max_model_len - req.num_tokens)
        while k > 1 and self.kv.num_blocks_to_grow(running, k) > self.kv.pool.num_free_blocks:
            k //= 2
        return k if k > 1 else 0

    def decode_run_events(self, num_steps: int) -> list[tuple[int, int, Request]]:
        """(step, ALLOCATE or FILL, request) for each block a decode run allocates or fills,
        in the order `schedule()` and `update_from_output` would meet them: by step, the
        step's allocations before its fills, requests in policy order."""
        bs = self.kv.block_size
        events = []
        for rank, req in enumerate(sorted(self.running, key=self._key)):
            computed = req.num_computed_tokens
            capacity = len(self.kv.block_table(req.request_id)) * bs
            events += [(j, ALLOCATE, rank, req)
                       for j in range(capacity - computed, num_steps, bs)]
            events += [(j, FILL, rank, req)
                       for j in range((-(computed + 1)) % bs, num_steps, bs)]
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        return [(j, phase, req) for j, phase, _, req in events]

    def advance_decode(self, req: Request, tokens: list[int], computed: int, length: int,
                       num_steps: int) -> None:
        """`req` as after `num_steps` steps of a run that began at `computed` tokens
        computed and `length` tokens: tokens appended, newly full blocks published."""
        req.token_ids.extend(tokens[req.num_tokens - length : num_steps])
        req.num_computed_tokens = computed + num_steps
        self.kv.cache_blocks(req)

    def finish_decode_run(self, out: SchedulerOutput, tokens: dict[str, list[int]],
                          num_steps: int) -> list[Request]:
        """The end of a run: every request advanced by `num_steps` tokens, the stop checks
        of its last token (none can stop before). Returns them (all got tokens)."""
        updated = []
        for seq in out.seqs:
            req = self.requests[seq.request_id]
            run = tokens[seq.request_id]
            self.advance_decode(req, run, seq.num_computed_tokens,
                                seq.num_computed_tokens + 1, num_steps)
            updated.append(req)
            if self._usage is not None:
                self._usage.on_scheduled(req, num_steps)
            self._check_stop(req, run[-1])
        return updated
