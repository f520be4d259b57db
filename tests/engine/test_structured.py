"""Structured output and logit bias in the engine, with a tiny random-weight model (float32).

A random model's unconstrained text is noise, so whatever pattern its output follows is the
grammar's doing.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from kvmesh import LLM, SamplingParams
from kvmesh.engine.structured import Grammars, closed_objects
from kvmesh.types import StructuredOutput


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=512)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(5, 40))] for _ in range(n)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_and_choice_constraints_hold_on_a_random_model(llm, temperature):
    ps = _prompts(6, seed=1)
    regex = SamplingParams(temperature=temperature, seed=5, max_tokens=40,
                           structured=StructuredOutput("regex", r"[a-c]{3}-[0-9]{2,4}"))
    choices = ["alpha", "beta gamma", "delta"]
    choice = SamplingParams(temperature=temperature, seed=6, max_tokens=40,
                            structured=StructuredOutput("choice", json.dumps(choices)))
    for out in llm.generate(ps, regex):
        assert re.fullmatch(r"[a-c]{3}-[0-9]{2,4}", out.text), out.text
        assert out.finish_reason == "stop"  # the grammar ends it: only EOS is left
    assert {o.text for o in llm.generate(ps, choice)} <= set(choices)


def test_json_schema_output_validates_on_a_random_model(llm):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object",
              "properties": {"ok": {"type": "boolean"},
                             "kind": {"enum": ["a", "b"]},
                             "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "kind", "n"]}
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=60,
                            structured=StructuredOutput("json_schema", json.dumps(schema)))
    outs = llm.generate(_prompts(8, seed=2), params)
    for out in outs:
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        assert set(value) == {"ok", "kind", "n"}  # no invented keys (closed objects)


def test_a_batch_mixing_constrained_and_free_rows_leaves_free_rows_unchanged(llm):
    free = _prompts(4, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(free, params)]
    constrained = SamplingParams(temperature=0.0, max_tokens=12,
                                 structured=StructuredOutput("regex", "[0-9]{12}"))
    mixed = llm.generate(free + _prompts(4, seed=4), [params] * 4 + [constrained] * 4)
    assert [o.token_ids for o in mixed[:4]] == alone
    assert all(re.fullmatch("[0-9]{12}", o.text) for o in mixed[4:])


def test_a_minus_100_logit_bias_removes_the_greedy_token(llm):
    p = _prompts(1, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate(p, params)[0].token_ids[0]
    biased = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                            logit_bias=((first, -100.0),))
    out = llm.generate(p, biased)[0].token_ids
    assert first not in out
    boosted = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                             logit_bias=((7, 100.0),))
    assert llm.generate(p, boosted)[0].token_ids == [7] * 6


def test_sampling_params_refuse_bad_bias_and_constraints():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((3, 101.0),))
    with pytest.raises(ValueError, match="kind"):
        StructuredOutput("xml", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        StructuredOutput("regex", "")


def test_grammars_compile_once_and_refuse_what_cannot_compile(llm):
    grammars: Grammars = llm.engine.inputs.grammars
    spec = StructuredOutput("json_schema", json.dumps({"type": "object"}))
    grammars.check(spec)
    first = grammars._cache[spec]
    grammars.check(spec)
    assert grammars._cache[spec] is first
    for bad in [StructuredOutput("json_schema", '{"type": "nosuch"}'),
                StructuredOutput("json_schema", "{not json"),
                StructuredOutput("regex", "(["),
                StructuredOutput("choice", "[]"),
                StructuredOutput("grammar", "start: ???")]:
        with pytest.raises(ValueError, match="invalid"):
            grammars.check(bad)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[5, 6]], SamplingParams(logit_bias=((10**6, 1.0),)))
    llm.engine.core.scheduler.check_integrity()


def test_closed_objects_close_every_object_that_lists_properties():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "array", "items": {"type": "object", "properties": {}}},
        "properties": {"type": "string"}},
        "$defs": {"d": {"properties": {"y": {}}, "additionalProperties": True}}}
    out = closed_objects(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["b"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["properties"]
    assert out["$defs"]["d"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # a copy


@pytest.mark.parametrize("max_tokens", [16, 24, 40])
def test_json_outputs_close_before_their_budget_runs_out(llm, max_tokens):
    spec = StructuredOutput("json_schema", json.dumps(
        {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}},
                                          "b": {"type": "object"}}}))
    for structured in (StructuredOutput("json"), spec):
        params = SamplingParams(temperature=1.0, seed=max_tokens, max_tokens=max_tokens,
                                structured=structured)
        for out in llm.generate(_prompts(6, seed=7), params):
            assert isinstance(json.loads(out.text), dict), out.text
            assert out.finish_reason == "stop" and len(out.token_ids) <= max_tokens


def test_json_depth_counts_what_is_left_to_close():
    from kvmesh.engine.structured import JsonDepth

    d = JsonDepth()
    d.feed(b'{"a": [1, {"b": "x}]\\"')
    assert (d.depth, d.in_string, d.to_close) == (3, True, 4)
    d.feed(b'"}')
    assert d.to_close == 2


@pytest.mark.slow
def test_default_model_free_rows_are_unchanged_beside_constrained_ones():
    llm = LLM("smollm2-135m-instruct", dtype="float32")
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    free = [chat.format(q) for q in ("Name three rivers.", "What is a prime number?",
                                     "Write a haiku about snow.")]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    alone = [o.token_ids for o in llm.generate(free, params)]
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 30},
                                               "km": {"type": "integer"}},
              "required": ["river", "km"]}
    constrained = SamplingParams(temperature=0.0, max_tokens=40, structured=StructuredOutput(
        "json_schema", json.dumps(schema)))
    asks = [chat.format(q) for q in ("The Nile as JSON.", "The Danube as JSON.")]
    mixed = llm.generate(free + asks, [params] * 3 + [constrained] * 2)
    assert [o.token_ids for o in mixed[:3]] == alone
    for out in mixed[3:]:
        assert set(json.loads(out.text)) == {"river", "km"}


def test_forced_calls_keep_each_tools_refs_resolvable(llm):
    from kvmesh.server.tools import Tool, plan

    def tool(name: str, defs_key: str) -> Tool:
        return Tool.model_validate({"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"where": {"$ref": f"#/{defs_key}/Loc"}},
            "required": ["where"],
            defs_key: {"Loc": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}}}})

    tools = [tool("a", "$defs"), tool("b", "definitions")]
    spec = plan(tools, "required", False).constraint()
    llm.engine.inputs.grammars.check(spec)
    schema = json.loads(spec.spec)
    assert set(schema["$defs"]) == {"tool0_Loc", "tool1_Loc"}
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=120, structured=spec)
    jsonschema = pytest.importorskip("jsonschema")
    for out in llm.generate(_prompts(3, seed=9), params):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
