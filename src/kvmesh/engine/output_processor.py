"""Above the core: turns sequence updates into the deltas clients stream.

Detokenizes each sequence incrementally, matches stop strings (and ends the sequence in
the core when one matches), and maps each sequence back to its request and index, so an
`n > 1` request fans out into `n` choices. Engine thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmesh.engine.core import SeqUpdate
from kvmesh.engine.detokenizer import Decoder, IncrementalDetokenizer
from kvmesh.types import FinishReason, RequestDelta, SamplingParams

FinishHook = Callable[[str, FinishReason, str], None]  # seq id, reason, the stop string


@dataclass
class _Seq:
    request_id: str
    index: int
    detok: IncrementalDetokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Decoder):
        self.tokenizer = tokenizer
        self._seqs: dict[str, _Seq] = {}

    def add(self, request_id: str, seq_ids: Sequence[str], prompt_ids: Sequence[int],
            params: SamplingParams) -> None:
        for index, seq_id in enumerate(seq_ids):
            detok = IncrementalDetokenizer(self.tokenizer, params.stop,
                                           params.include_stop_str_in_output, prompt_ids)
            self._seqs[seq_id] = _Seq(request_id, index, detok)

    def abort(self, seq_ids: Sequence[str]) -> list[RequestDelta]:
        deltas = []
        for seq_id in seq_ids:
            seq = self._seqs.pop(seq_id, None)
            if seq is not None:
                deltas.append(RequestDelta(seq.request_id, seq.index, (), "", "abort"))
        return deltas

    def process(self, updates: Sequence[SeqUpdate], finish: FinishHook) -> list[RequestDelta]:
        return [d for u in updates if (d := self._delta(u, finish)) is not None]

    def _delta(self, u: SeqUpdate, finish: FinishHook) -> RequestDelta | None:
        seq = self._seqs.get(u.seq_id)
        if seq is None:
            return None
        if u.token_id is None:  # the step failed
            del self._seqs[u.seq_id]
            return RequestDelta(seq.request_id, seq.index, (), "", u.finish_reason or "error",
                                num_prompt_tokens=u.num_prompt_tokens, error=u.error)
        text, stop, tokens = "", None, []
        for token in (*u.accepted_ids, u.token_id):  # a verified draft: token by token
            piece, stop = seq.detok.add(token)
            text += piece
            tokens.append(token)
            if stop is not None:
                break
        reason, stop_reason = u.finish_reason, u.stop_reason
        if stop is not None and (reason is None or len(tokens) <= len(u.accepted_ids)):
            finish(u.seq_id, "stop", stop)
            reason, stop_reason = "stop", stop
        if reason is not None:
            text += seq.detok.flush()
            del self._seqs[u.seq_id]
        return RequestDelta(
            seq.request_id, seq.index, tuple(tokens), text, reason, stop_reason,
            num_prompt_tokens=u.num_prompt_tokens, num_cached_tokens=u.num_cached_tokens,
            logprobs=(u.logprobs,) if u.logprobs is not None else None,
            queue_time_s=u.queue_time_s)
