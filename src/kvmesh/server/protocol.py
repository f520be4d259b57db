"""Request bodies of the OpenAI API (plus vLLM-style extras), validated by pydantic.

Pydantic lives here, at the HTTP edge only; `to_sampling_params` hands the engine a
plain frozen SamplingParams.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from kvmesh.server.tools import Tool, ToolChoice
from kvmesh.types import SamplingParams, StructuredOutput

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]

# Fields of the OpenAI (or vLLM) API that change what is generated and that kvmesh does
# not implement, with the values that ask for nothing (their defaults): any other value is
# refused with a 400, never silently dropped. Fields not named anywhere are ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []), "function_call": (None, "none"), "prediction": (None,),
    "audio": (None,), "modalities": (None, ["text"]), "web_search_options": (None,),
    "reasoning_effort": (None,), "best_of": (None, 1), "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0), "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "truncate_prompt_tokens": (None,),
    "chat_template": (None,), "continue_final_message": (None, False),
    "structural_tag": (None,), "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,), "prompt_logprobs": (None,),
    "allowed_token_ids": (None,), "bad_words": (None, []), "logits_processors": (None,),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False  # per-chunk usage is not implemented


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json")
        if self.json_schema is None:
            raise ValueError("response_format json_schema needs a json_schema object")
        schema = self.json_schema.schema_
        return StructuredOutput("json_schema",
                                json.dumps({} if schema is None or schema is True else schema))


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    priority: int = 0
    cache_salt: str | None = Field(None, max_length=256)
    result_cache: bool = True  # False: never answered from (or stored in) the result cache
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extras
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1)
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    guided_grammar: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            named = [k for k, fine in UNSUPPORTED.items() if data.get(k) not in fine]
            if named:
                raise ValueError(f"{', '.join(named)} {'is' if len(named) == 1 else 'are'} "
                                 "not supported by this server")
        return data

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if v and len(v) > 300:
            raise ValueError("logit_bias may name at most 300 tokens")
        return v

    def structured(self) -> StructuredOutput | None:
        """The one output constraint asked for (ValueError when several are)."""
        asked: list[StructuredOutput] = []
        if self.response_format is not None:
            spec = self.response_format.structured()
            if spec is not None:
                asked.append(spec)
        if self.guided_json is not None:
            text = self.guided_json if isinstance(self.guided_json, str) else json.dumps(
                self.guided_json)
            asked.append(StructuredOutput("json_schema", text))
        if self.guided_regex is not None:
            asked.append(StructuredOutput("regex", self.guided_regex))
        if self.guided_choice is not None:
            asked.append(StructuredOutput("choice", json.dumps(self.guided_choice)))
        if self.guided_grammar is not None:
            asked.append(StructuredOutput("grammar", self.guided_grammar))
        if len(asked) > 1:
            raise ValueError("ask for one output constraint at most (response_format, "
                             "guided_json, guided_regex, guided_choice, guided_grammar)")
        return asked[0] if asked else None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty")
        return v

    def sampling(self, max_tokens: int | None, logprobs: int | None,
                 structured: StructuredOutput | None = None) -> SamplingParams:
        """The engine's parameters (ValueError: a 400). `structured` overrides the body's
        own constraint (a forced tool call)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=None if self.top_k in (None, -1, 0) else self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            structured=structured or self.structured(),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str
    arguments: str = "{}"


class ToolCallIn(BaseModel):
    """A call an earlier assistant turn made (sent back with the conversation)."""

    model_config = ConfigDict(strict=True)

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        return out
