"""When and what to speculate: drafts for the running sequences before each step. Pure.

A sequence gets a draft (from the `drafter.Drafter`: prompt lookup, or a draft model)
when speculation is on, it is decoding, its sampling needs nothing from the tokens before
each drafted one (no penalties, grammar, logit bias or logprobs), and few sequences run (a
big batch is compute-bound: verifying drafts there costs more than it saves). A draft never
holds an end-of-sequence or stop token and never runs past `max_tokens` or the context.

Speculation turns itself down where it does not pay: each sequence keeps a moving
average of the share of its drafts accepted and stops drafting while that is under
`MIN_ACCEPTANCE`, and after a step whose draft was wholly rejected it waits 2, 4, ... 32
steps before drafting again. While it waits, a drafter with a `strong_match` (prompt
lookup: its longest n-gram) still drafts from a match that long: the output repeating a
passage, which after a stretch of prose the back-off would otherwise miss. A drafter
that raises costs a step's drafts, never a request; after MAX_DRAFT_FAILURES in a row,
speculation stays off.

How long a draft may be adapts per sequence, within 1..k (`num_speculative_tokens`): it
starts at min(k, START_LENGTH), doubles after a draft accepted whole and drops to one past
the accepted tokens after a draft cut short (after a wholly rejected one, the draft that
follows the back-off is a one-token probe). A verify step's rows cost little each on top
of the step (the weights are read once for all), so a sequence that copies its context
(an edit, a repeated passage) verifies long drafts, while one whose drafts miss early pays
for short ones only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from kvmesh.config import SchedulerConfig
from kvmesh.engine.drafter import Drafter, DraftWant, NgramDrafter
from kvmesh.engine.request import Request
from kvmesh.types import SamplingParams

MAX_BACKOFF_STEPS = 32
MAX_DRAFT_FAILURES = 3  # drafter exceptions in a row before speculation turns off
MIN_ACCEPTANCE = 0.3  # under this share of drafted tokens accepted, drafting backs off
EMA_WEIGHT = 0.3  # of the latest step in a sequence's acceptance average
START_LENGTH = 4  # a sequence's first draft length (then adapted within 1..k)


def can_speculate(p: SamplingParams) -> bool:
    """Sampling that needs nothing from the tokens before each drafted one. A seeded
    sampled request is left out too: whether it gets a draft depends on the load, and a
    verify step draws from its generator differently, so its text would not repeat."""
    seeded = p.seed is not None and not p.is_greedy
    return not (p.has_penalties or p.structured is not None or p.logit_bias
                or p.logprobs is not None or seeded)


class Speculator:
    def __init__(self, config: SchedulerConfig, max_model_len: int,
                 drafter: Drafter | None = None):
        self.k = config.num_speculative_tokens
        self.start_length = min(self.k, START_LENGTH)
        self.max_seqs = config.speculative_max_seqs
        self.max_model_len = max_model_len
        if drafter is None and config.speculative_method != "ngram":
            raise ValueError(f"speculative_method {config.speculative_method!r} needs a drafter")
        self.drafter: Drafter = drafter if drafter is not None else NgramDrafter()
        self.last_error: Exception | None = None  # the drafter's, for the caller to log
        self._failures = 0  # drafter failures in a row
        self._backoff: dict[str, tuple[int, int]] = {}  # seq -> (steps to skip, next skip)
        self._rate: dict[str, float] = {}  # seq -> moving average of its acceptance
        self._length: dict[str, int] = {}  # seq -> the most it may draft next (1..k)
        self.num_drafted = 0
        self.num_accepted = 0
        self.num_verify_steps = 0  # sequence-steps that verified a draft

    def draft(self, running: list[Request]) -> None:
        """Set each running sequence's `spec_token_ids` for the coming step."""
        active = len(running) <= self.max_seqs
        wants: list[tuple[Request, DraftWant]] = []
        for req in running:
            req.spec_token_ids = []
            room, min_match = self._room(req) if active else (0, 0)
            if room > 0:
                wants.append((req, DraftWant(req.request_id, req.token_ids, room, min_match)))
        if not wants:
            return
        try:
            drafts = self.drafter.propose([w for _, w in wants])
        except Exception as exc:  # noqa: BLE001 - a failing drafter costs speed, not requests
            self._failed(exc, [w.seq_id for _, w in wants])
            return
        self._failures = 0
        for (req, _), draft in zip(wants, drafts, strict=True):
            stops = req.eos_token_ids | set(req.params.stop_token_ids)
            cut = next((i for i, t in enumerate(draft) if t in stops), len(draft))
            req.spec_token_ids = list(draft[:cut])

    def _failed(self, exc: Exception, seq_ids: list[str]) -> None:
        """The drafter raised (a draft model's forward failed): this step decodes plainly,
        the drafter forgets those sequences (their draft state may be half written), and
        after MAX_DRAFT_FAILURES failures in a row speculation turns off."""
        self.last_error = exc
        self._failures += 1
        with contextlib.suppress(Exception):  # turned off below if it keeps failing
            self.drafter.forget(seq_ids)
        if self._failures >= MAX_DRAFT_FAILURES and self.max_seqs:
            self.max_seqs = 0  # the engine logs last_error: say that speculation is off
            self.last_error = RuntimeError(
                f"the drafter failed {self._failures} times in a row; speculative decoding "
                f"is off from now on (last: {type(exc).__name__}: {exc})")

    def _room(self, req: Request) -> tuple[int, int]:
        """How many tokens `req` may draft this step (0: none) and the match it needs (0:
        any; a strong one while it backs off)."""
        p = req.params
        if req.num_pending_tokens != 1 or not can_speculate(p):
            return 0, 0
        room = self.max_model_len - req.num_tokens - 1
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - req.num_output_tokens - 1)
        length = self._length.get(req.request_id, self.start_length)
        min_match = 0
        if self._backing_off(req.request_id):
            min_match = getattr(self.drafter, "strong_match", 0)
            if not min_match:
                return 0, 0
            length = max(length, self.start_length)
        return max(0, min(length, room)), min_match

    def _backing_off(self, seq_id: str) -> bool:
        """Whether `seq_id` waits this step (counting the wait down)."""
        skip, step = self._backoff.get(seq_id, (0, 2))
        if skip:
            self._backoff[seq_id] = (skip - 1, step)
            if skip == 1:  # a fresh start after the wait
                self._rate.pop(seq_id, None)
            return True
        if self._rate.get(seq_id, 1.0) < MIN_ACCEPTANCE:
            self._backoff[seq_id] = (step, min(2 * step, MAX_BACKOFF_STEPS))
            return True
        return False

    def observe(self, seq_id: str, num_drafted: int, num_accepted: int) -> None:
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        self.num_verify_steps += 1
        self._adapt_length(seq_id, num_drafted, num_accepted)
        last = num_accepted / num_drafted if num_drafted else 0.0
        rate = self._rate.get(seq_id)
        self._rate[seq_id] = last if rate is None else (
            EMA_WEIGHT * last + (1 - EMA_WEIGHT) * rate)
        if num_accepted and self._rate[seq_id] >= MIN_ACCEPTANCE:
            self._backoff.pop(seq_id, None)
            return
        _, step = self._backoff.get(seq_id, (0, 2))
        self._backoff[seq_id] = (step, min(2 * step, MAX_BACKOFF_STEPS))

    def _adapt_length(self, seq_id: str, num_drafted: int, num_accepted: int) -> None:
        """Double the next draft's length after one accepted whole, else cut it to one past
        what was accepted (the draft missed there: the next is likely to miss early too)."""
        length = self._length.get(seq_id, self.start_length)
        if num_drafted and num_accepted == num_drafted:
            length = max(length, 2 * num_drafted)
        else:
            length = num_accepted + 1
        self._length[seq_id] = max(1, min(self.k, length))

    def forget(self, seq_ids: Iterable[str]) -> None:
        seq_ids = list(seq_ids)
        self.drafter.forget(seq_ids)
        for seq_id in seq_ids:
            self._backoff.pop(seq_id, None)
            self._rate.pop(seq_id, None)
            self._length.pop(seq_id, None)

    def counts(self) -> SpecCounts:
        """The counters now. Safe off the engine thread: `observe` grows drafted before
        accepted, so reading accepted first and drafted last keeps accepted <= drafted."""
        accepted, steps = self.num_accepted, self.num_verify_steps
        return SpecCounts(self.num_drafted, accepted, steps)

    @property
    def acceptance_rate(self) -> float:
        return self.counts().acceptance_rate

    @property
    def tokens_per_step(self) -> float:
        return self.counts().tokens_per_step


@dataclass(frozen=True)
class SpecCounts:
    """Drafted and accepted tokens and verifying sequence-steps (a snapshot, or the
    difference of two)."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a verifying sequence-step produced on average (accepted + 1)."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    def __sub__(self, other: SpecCounts) -> SpecCounts:
        return SpecCounts(self.drafted - other.drafted, self.accepted - other.accepted,
                          self.verify_steps - other.verify_steps)
