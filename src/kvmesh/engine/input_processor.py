"""At the frontend: tokenize and validate a prompt once, and hand token ids to the engine.

Thread-safe (the tokenizer is): the server runs it on a worker thread, off the event loop,
so a long prompt never stalls other streams. Errors are ValueErrors with a message fit
for an HTTP 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmesh.engine.structured import Grammars
from kvmesh.model.tokenizer import Message, Tokenizer
from kvmesh.types import Prompt, SamplingParams


def check_lengths(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """The length rules a request must meet (ValueError: the server's 400). Pure: the
    simulator applies the same rules."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_prompt_tokens} tokens, but max_model_len is "
            f"{max_model_len} (prompt plus at least one output token)")
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
            f"max_model_len ({max_model_len})")


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int,
                 grammars: Grammars | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.grammars = grammars

    def check_sampling(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids within this vocabulary, and a
        constraint that compiles (compiled once here, off the engine thread)."""
        for token, _ in params.logit_bias:
            if token >= self.vocab_size:
                raise ValueError(f"logit_bias names token {token}, outside the vocabulary "
                                 f"(size {self.vocab_size})")
        if params.structured is not None:
            if self.grammars is None:
                raise ValueError("structured output is not available for this model")
            if params.ignore_eos or params.min_tokens:
                raise ValueError("ignore_eos and min_tokens cannot be combined with "
                                 "structured output (a complete output must end)")
            self.grammars.check(params.structured)

    def token_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text is tokenized), not yet validated."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def chat_ids(self, messages: Sequence[Message], **template_kwargs: Any) -> list[int]:
        return self.tokenizer.encode_chat(messages, **template_kwargs)

    def default_max_tokens(self, ids: Sequence[int]) -> int:
        """What `max_tokens` unset means: the rest of the context (at least 1)."""
        return max(1, self.max_model_len - len(ids))

    def validate(self, ids: Sequence[int], max_tokens: int | None = None) -> None:
        """Raise ValueError if the prompt cannot be served."""
        if not ids:
            raise ValueError("prompt is empty")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        check_lengths(len(ids), max_tokens, self.max_model_len)

    def process(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Tokenize and validate once."""
        ids = self.token_ids(prompt)
        self.validate(ids, params.max_tokens)
        self.check_sampling(params)
        return ids
