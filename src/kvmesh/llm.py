"""Offline Python API in the shape vLLM users know: LLM(...).generate / .chat."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from kvmesh.config import DEFAULT_MODEL, engine_config_from_kwargs
from kvmesh.engine.engine import LLMEngine
from kvmesh.model.tokenizer import Message
from kvmesh.types import CompletionOutput, Prompt, RequestDelta, RequestOutput, SamplingParams


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt given as token ids
    return items


class LLM:
    """Load a model (the default one with no arguments) and generate in batches.

    Keyword arguments are fields of ModelConfig, CacheConfig, SchedulerConfig and
    TierConfig, by name (or `section_field` where a name is ambiguous).
    """

    def __init__(self, model: str = DEFAULT_MODEL, progress: bool = False, **kwargs: Any):
        config = engine_config_from_kwargs(model, **kwargs)
        self.engine = LLMEngine(config, progress=progress)
        self._counter = 0

    def close(self) -> None:
        """Finish pending disk writes and stop I/O threads."""
        self.engine.close()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs keep the input order."""
        items = _as_prompt_list(prompts)
        plist = (
            list(params)
            if isinstance(params, Sequence)
            else [params or SamplingParams()] * len(items)
        )
        if len(plist) != len(items):
            raise ValueError(f"{len(items)} prompts but {len(plist)} SamplingParams")
        outputs: dict[str, RequestOutput] = {}
        order = []
        for i, (prompt, p) in enumerate(zip(items, plist, strict=True)):
            self._counter += 1
            rid = f"llm-{self._counter}"
            ids = self.engine.inputs.process(prompt, p)
            self.engine.add_tokens(rid, ids, p, priority[i] if priority else 0, cache_salt)
            text = prompt if isinstance(prompt, str) else None
            outputs[rid] = RequestOutput(rid, text, ids, [CompletionOutput(j) for j in range(p.n)])
            order.append(rid)
        self._run(outputs, use_tqdm)
        return [outputs[rid] for rid in order]

    def _run(self, outputs: dict[str, RequestOutput], use_tqdm: bool) -> None:
        bar = tqdm(total=len(outputs), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                out = outputs[delta.request_id]
                _apply(out, delta)
                if delta.finished and out.finished:
                    bar.update(1)
        bar.close()

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | None = None,
        use_tqdm: bool = False,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        inputs = self.engine.inputs
        prompts: list[Prompt] = [inputs.chat_ids(c, **template_kwargs) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm=use_tqdm)


def _apply(out: RequestOutput, delta: RequestDelta) -> None:
    comp = out.outputs[delta.index]
    comp.token_ids.extend(delta.new_token_ids)
    comp.text += delta.new_text
    if delta.logprobs is not None:
        comp.logprobs = (comp.logprobs or []) + list(delta.logprobs)
    out.num_cached_tokens = (
        max(out.num_cached_tokens, delta.num_cached_tokens)
        if delta.index
        else (delta.num_cached_tokens)
    )
    if delta.finished:
        comp.finish_reason = delta.finish_reason
        comp.stop_reason = delta.stop_reason
        if delta.error:
            raise RuntimeError(f"request {out.request_id} failed: {delta.error}")
