"""Tool calling: tools into the prompt, a grammar for forced calls, tool calls out of the text.

The wire format is the Hermes one many open chat models are trained on (Qwen, Hermes,
SmolLM3): a call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. A chat
template that knows tools (it mentions `tools`) renders them itself; for one that does
not, the tools and the calling convention go into the system message, and earlier calls
and results are written into the messages as text. In auto mode only this format is
parsed: a model that writes calls another way (Llama 3.1's bare JSON, Mistral's
`[TOOL_CALLS]`) gets them back as content; forced calls work with any model.

- `tool_choice="none"` (or no tools): plain chat; the tools are not shown.
- `"auto"`: the model decides; calls are parsed out of its text.
- `"required"`: the output is constrained to a JSON list of calls, each naming one of the
  tools and carrying arguments valid against that tool's schema.
- a named function: the output is constrained to that function's arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmesh.types import StructuredOutput

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters or {"type": "object", "properties": {}}


class Tool(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"]
    function: FunctionDef


class _FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"]
    function: _FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools: `mode` is auto, required or the forced
    function's name."""

    tools: tuple[Tool, ...]
    mode: str
    parallel: bool = True

    @property
    def forced_name(self) -> str | None:
        return None if self.mode in ("auto", "required") else self.mode

    def constraint(self) -> StructuredOutput | None:
        """The grammar a forced call is sampled under (None for auto)."""
        if self.mode == "auto":
            return None
        if self.forced_name is not None:
            fn = next(t.function for t in self.tools if t.function.name == self.forced_name)
            return StructuredOutput("json_schema", json.dumps(fn.arguments_schema()))
        defs: dict[str, Any] = {}
        alternatives = []
        for i, t in enumerate(self.tools):
            args = _hoist_defs(t.function.arguments_schema(), f"tool{i}_", defs)
            alternatives.append(
                {"type": "object", "properties": {"name": {"const": t.function.name},
                                                  "arguments": args},
                 "required": ["name", "arguments"], "additionalProperties": False})
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": alternatives},
                                 "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        if defs:
            array["$defs"] = defs
        return StructuredOutput("json_schema", json.dumps(array))

    def system_prompt(self) -> str:
        specs = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in self.tools)
        text = ("You can call functions. The available functions, as JSON schemas:\n"
                f"<tools>\n{specs}\n</tools>\n"
                "To call one, reply with "
                f'{CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
                f"{CALL_CLOSE}.")
        if self.mode == "required":
            text += ('\nYou must call at least one function now: reply only with a JSON '
                     'list of calls, [{"name": ..., "arguments": {...}}].')
        elif self.forced_name is not None:
            text += (f"\nYou must call {self.forced_name} now: reply only with its "
                     "arguments as a JSON object.")
        return text


def _hoist_defs(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> Any:
    """A tool's schema, nested under the forced-call array, with its `$defs` (or
    `definitions`) moved to the root under `prefix`ed names and its `$ref`s rewritten, so
    that they still resolve (pydantic-made schemas use them)."""
    own = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not own:
        return schema

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items() if k not in ("$defs", "definitions")}
            ref = node.get("$ref")
            if isinstance(ref, str):
                for base in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(base):
                        out["$ref"] = f"#/$defs/{prefix}{ref[len(base):]}"
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, sub in own.items():
        defs[f"{prefix}{name}"] = rewrite(sub)
    return rewrite(schema)


def plan(tools: list[Tool] | None, choice: ToolChoice | None,
         parallel: bool | None) -> ToolPlan | None:
    """The request's tool plan (None: plain chat). ValueError for an inconsistent one."""
    if choice is not None and not tools and choice != "none":
        raise ValueError("tool_choice needs tools")
    if not tools or choice == "none":
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError("tool names must be unique")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among "
                             f"the tools ({', '.join(names)})")
        mode: str = choice.function.name
    else:
        mode = choice or "auto"
    return ToolPlan(tuple(tools), mode, parallel is not False)


def template_uses_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def render_messages(messages: list[dict[str, Any]], plan_: ToolPlan | None,
                    native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (and template kwargs) for the chat template. With `native`, the template
    sees the tools and structured calls; otherwise they are written in as text."""
    if native:
        kwargs = {"tools": [t.model_dump(exclude_none=True) for t in plan_.tools]} if plan_ else {}
        return messages, kwargs
    out = [_as_text(m) for m in messages]
    if plan_ is not None:
        prompt = plan_.system_prompt()
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _as_text(m: dict[str, Any]) -> dict[str, Any]:
    calls = m.get("tool_calls") or []
    content = m.get("content") or ""
    if m["role"] == "assistant" and calls:
        text = "".join(f"{CALL_OPEN}{json.dumps(_call_body(c))}{CALL_CLOSE}" for c in calls)
        return {"role": "assistant", "content": content + text}
    if m["role"] == "tool":
        return {"role": "tool", "content": f"<tool_response>{content}</tool_response>"}
    return {"role": m["role"], "content": content}


def _call_body(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]  # validated by the request model (ToolCallIn)
    args = fn.get("arguments", "{}")
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        parsed = args
    return {"name": fn.get("name"), "arguments": parsed}


def new_call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


@dataclass
class ToolParser:
    """Follows one choice's text: what may be shown as content now, and its calls at the
    end. In auto mode content streams until a call may begin; forced calls are held whole."""

    plan: ToolPlan
    text: str = ""
    shown: int = 0
    in_calls: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, new_text: str) -> str:
        """Add generated text; return the content that is safe to show now."""
        self.text += new_text
        if self.plan.mode != "auto" or self.in_calls:
            return ""
        at = self.text.find(CALL_OPEN, self.shown)
        if at >= 0:
            self.in_calls = True
            return self._show(at)
        return self._show(len(self.text) - _partial_suffix(self.text, CALL_OPEN))

    def _show(self, upto: int) -> str:
        out = self.text[self.shown:upto]
        self.shown = max(self.shown, upto)
        return out

    def finish(self) -> str:
        """Parse the calls; return content not shown yet (all held text if none parse)."""
        calls = self._parse()
        if calls is None:
            return self._show(len(self.text))
        self.calls = [new_call(name, args) for name, args in calls]
        return ""

    def _parse(self) -> list[tuple[str, Any]] | None:
        names = {t.function.name for t in self.plan.tools}
        try:
            if self.plan.forced_name is not None:
                args = json.loads(self.text)
                return [(self.plan.forced_name, args)] if isinstance(args, dict) else None
            if self.plan.mode == "required":
                items = json.loads(self.text)
            else:
                rest = self.text[self.shown:]
                items = [json.loads(body) for body in _CALL_RE.findall(rest)]
        except json.JSONDecodeError:
            return None
        calls = []
        for item in items if isinstance(items, list) else []:
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or name not in names:
                return None
            args = item.get("arguments", item.get("parameters", {}))
            if not isinstance(args, dict):
                return None
            calls.append((name, args))
        if not self.plan.parallel:
            calls = calls[:1]
        return calls or None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (held back: it may grow
    into a call)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
