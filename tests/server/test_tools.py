"""Tool plans and the tool-call parser, on their own (no model): every mode's grammar,
prompt and parsing, and the streaming hold-back of a call's opening tag."""

from __future__ import annotations

import json

import pytest

from kvmesh.server.tools import NamedToolChoice, Tool, ToolParser, plan, render_messages

TOOLS = [Tool.model_validate({"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}},
                                  "required": ["a"]}}}),
         Tool.model_validate({"type": "function", "function": {"name": "noop"}})]


def _feed(parser: ToolParser, pieces: list[str]) -> str:
    shown = "".join(parser.feed(p) for p in pieces)
    return shown + parser.finish()


def test_auto_mode_streams_prose_and_parses_calls_split_across_deltas():
    p = ToolParser(plan(TOOLS, "auto", None))
    pieces = ["Sure, ", "let me <", "tool", "_call>{\"name\": \"add\", ", "\"arguments\": ",
              "{\"a\": 2}}</tool_call>"]
    shown = [p.feed(x) for x in pieces]
    assert shown[:2] == ["Sure, ", "let me "]  # "<" held back: it may open a call
    assert "".join(shown) + p.finish() == "Sure, let me "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in p.calls] \
        == [("add", {"a": 2})]
    assert p.calls[0]["id"].startswith("call_")


def test_auto_mode_without_a_valid_call_gives_all_text_back():
    for text in ["a < b, and <tool", "<tool_call>{not json}</tool_call>",
                 '<tool_call>{"name": ["add"], "arguments": {}}</tool_call>',
                 "<tool_call>[1, 2]</tool_call>",
                 '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>']:
        p = ToolParser(plan(TOOLS, "auto", None))
        assert _feed(p, [text[:5], text[5:]]) == text and p.calls == []


def test_required_and_named_modes_hold_everything_and_parse_it():
    req = ToolParser(plan(TOOLS, "required", None))
    assert _feed(req, ['[{"name": "noop", "arguments": {}}, ',
                       '{"name": "add", "arguments": {"a": 1}}]']) == ""
    assert [c["function"]["name"] for c in req.calls] == ["noop", "add"]
    named = ToolParser(plan(TOOLS, NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "add"}}), None))
    assert _feed(named, ['{"a":', " 5}"]) == ""
    assert named.calls[0]["function"] == {"name": "add", "arguments": '{"a": 5}'}
    cut = ToolParser(plan(TOOLS, "required", None))
    assert _feed(cut, ['[{"name": "ad']) == '[{"name": "ad' and cut.calls == []


def test_auto_mode_without_parallel_calls_keeps_the_first():
    p = ToolParser(plan(TOOLS, "auto", False))
    text = ('<tool_call>{"name": "noop", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert _feed(p, [text]) == "" and [c["function"]["name"] for c in p.calls] == ["noop"]


def test_plans_constrain_forced_calls_and_refuse_bad_choices():
    required = json.loads(plan(TOOLS, "required", False).constraint().spec)
    assert required["minItems"] == 1 and required["maxItems"] == 1
    names = [alt["properties"]["name"]["const"] for alt in required["items"]["anyOf"]]
    assert names == ["add", "noop"]
    named = plan(TOOLS, NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "add"}}), None)
    assert json.loads(named.constraint().spec)["required"] == ["a"]
    assert plan(TOOLS, "auto", None).constraint() is None
    assert plan(TOOLS, "none", None) is None and plan(None, None, None) is None
    with pytest.raises(ValueError, match="not among"):
        plan(TOOLS, NamedToolChoice.model_validate(
            {"type": "function", "function": {"name": "zzz"}}), None)
    with pytest.raises(ValueError, match="unique"):
        plan(TOOLS + TOOLS[:1], "auto", None)
    with pytest.raises(ValueError, match="needs tools"):
        plan(None, "required", None)


def test_messages_carry_tools_and_past_calls_as_text_for_a_template_without_tools():
    msgs = [{"role": "user", "content": "add 2"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "add", "arguments": '{"a": 2}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "4"}]
    out, kwargs = render_messages(msgs, plan(TOOLS, "auto", None), native=False)
    assert kwargs == {} and out[0]["role"] == "system" and '"add"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'
    assert out[3]["content"] == "<tool_response>4</tool_response>"
    native, kw = render_messages(msgs, plan(TOOLS, "auto", None), native=True)
    assert native == msgs and [t["function"]["name"] for t in kw["tools"]] == ["add", "noop"]
