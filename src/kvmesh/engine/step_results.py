"""What a step's results do to the scheduler's requests. Pure: no torch, no I/O.

`StepResults` is a part of `Scheduler` (a mixin): `update_from_output` advances each
scheduled request's computed tokens, appends its sampled token (or a speculative
sequence's verified run), caches its newly full blocks, and finishes the requests that
must stop (EOS, a stop token, `max_tokens`, or the model's length).
"""

from __future__ import annotations

from kvmesh.engine.kv_cache_manager import KVCacheManager
from kvmesh.engine.request import Request, RequestStatus
from kvmesh.engine.schedule import SchedulerOutput
from kvmesh.types import FinishReason


class StepResults:
    # the scheduler's state and the helper that finishing needs
    kv: KVCacheManager
    max_model_len: int
    requests: dict[str, Request]

    def finish_request(
        self, req: Request, reason: FinishReason, stop: str | int | None = None
    ) -> None:
        raise NotImplementedError

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int],
                           verified: dict[str, list[int]] | None = None) -> list[Request]:
        """Advance computed counts, append sampled tokens, and finish what must stop.
        A speculative sequence's `verified` tokens are its accepted draft, then the token
        sampled after it; the rest of its draft (and that KV) is dropped.

        Returns the requests that got a new token (finished ones included).
        """
        updated: list[Request] = []
        for seq in out.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            if seq.num_spec:
                req.spec_token_ids = []
                run = (verified or {}).get(seq.request_id)
                if run is None:  # an executor that does not verify: the draft is rejected
                    token = sampled.get(seq.request_id)
                    run = None if token is None else [token]
                if run is not None and self._accept_verified(run, req):
                    updated.append(req)
                continue
            req.num_computed_tokens += seq.num_new_tokens
            self.kv.cache_blocks(req)
            token = sampled.get(seq.request_id)
            if token is None:
                continue
            req.token_ids.append(token)
            updated.append(req)
            self._check_stop(req, token)
        return updated

    def _accept_verified(self, tokens: list[int], req: Request) -> bool:
        """Append a verified run (accepted draft, then one sampled token). The accepted
        draft's KV is computed (the step fed it), the rest of the draft's is not."""
        *accepted, last = tokens
        for token in accepted:
            req.token_ids.append(token)
            self._check_stop(req, token)
            if req.is_finished:
                return True
        req.num_computed_tokens += 1 + len(accepted)
        self.kv.cache_blocks(req)
        req.token_ids.append(last)
        self._check_stop(req, last)
        return True

    def _check_stop(self, req: Request, token: int) -> None:
        params = req.params
        num_out = req.num_output_tokens
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                self.finish_request(req, "stop", token)
                return
            if token in params.stop_token_ids:
                self.finish_request(req, "stop", token)
                return
        if (
            params.max_tokens is not None
            and num_out >= params.max_tokens
            or req.num_tokens >= self.max_model_len
        ):
            self.finish_request(req, "length")
