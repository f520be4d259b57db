"""Structured output and tool calling end to end: the real default model behind a real
server, driven by the official openai client; every output is checked with jsonschema.

Free-text ids and titles carry a maxLength, as real extraction schemas do: greedy
decoding with a 135M model can otherwise repeat inside a string ("12345678901234...")
until max_tokens, which ends the output with finish_reason "length", as OpenAI's API does.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server_process import serve

jsonschema = pytest.importorskip("jsonschema")

MODEL = "smollm2"

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"}}, "required": ["name", "age"]},
    "order": {"type": "object", "properties": {
        "id": {"type": "string", "maxLength": 24},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string"},
                                             "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"]}}},
        "required": ["id", "items"]},
    "weather": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "temperature": {"type": "number"}, "sunny": {"type": "boolean"}},
        "required": ["city", "unit", "temperature", "sunny"]},
    "book": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "year": {"type": "integer"},
        "authors": {"type": "array", "items": {"type": "string", "maxLength": 40},
                    "minItems": 1,
                    "maxItems": 2},
        "meta": {"type": "object", "properties": {"pages": {"type": "integer"},
                                                  "genre": {"enum": ["fiction", "science"]}},
                 "required": ["pages", "genre"]}},
        "required": ["title", "year", "authors", "meta"]},
    "event": {"type": "object", "properties": {
        "name": {"type": "string"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "priority": {"enum": ["low", "medium", "high"]},
        "attendees": {"type": "array", "maxItems": 3, "items": {"type": "string"}}},
        "required": ["name", "date", "priority"]},
}
PROMPTS = ["Describe {} as JSON.", "Give me a JSON record: {}.", "Make up an example of {}.",
           "Fill in the data for {}.", "Write {} in JSON, please."]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
]
ASK = [{"role": "user", "content": "What is the weather like in Lisbon right now?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--served-model-name", MODEL, "--max-num-seqs", "16"]
    with serve(args, tmp_path_factory.mktemp("structured")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=300)


def _schema_request(client, i: int) -> tuple[str, str]:
    name = list(SCHEMAS)[i % len(SCHEMAS)]
    prompt = PROMPTS[(i // len(SCHEMAS)) % len(PROMPTS)].format(f"a {name}")
    greedy = i % 2 == 0
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=400,
        temperature=0 if greedy else 0.8, seed=None if greedy else i,
        response_format={"type": "json_schema",
                         "json_schema": {"name": name, "schema": SCHEMAS[name]}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    return name, r.choices[0].message.content


@pytest.mark.slow
def test_fifty_schema_requests_all_validate_greedy_and_sampled(client):
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: _schema_request(client, i), range(50)))
    assert len(results) == 50
    for name, text in results:
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.slow
def test_json_object_always_parses_on_both_endpoints(client):
    for t in (0.0, 1.0):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "A JSON object about cats."}],
            max_tokens=300, temperature=t, seed=1, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    c = client.completions.create(model=MODEL, prompt="Cats, as JSON:", max_tokens=300,
                                  temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(c.choices[0].text), dict)
    g = client.completions.create(model=MODEL, prompt="Is the sky blue?", max_tokens=10,
                                  temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert g.choices[0].text in ("yes", "no")


def _stream_tool_calls(client, **kw) -> tuple[str | None, list[tuple[str, str]], str]:
    calls: dict[int, list[str]] = {}
    content, reason = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, ["", ""])
            slot[0] += tc.function.name or ""
            slot[1] += tc.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return reason, [(n, a) for n, a in calls.values()], content


def _check_calls(calls: list[tuple[str, str]], only: str | None = None) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls
    for name, args in calls:
        assert name in schemas and (only is None or name == only)
        jsonschema.validate(json.loads(args), schemas[name])


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_time"}}])
def test_forced_tool_calls_validate_streaming_and_not(client, choice):
    only = None if choice == "required" else "get_time"
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=200)
    for t in (0.0, 0.9):
        r = client.chat.completions.create(**kw, temperature=t, seed=2)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        assert all(c.id.startswith("call_") and c.type == "function" for c in msg.tool_calls)
        _check_calls([(c.function.name, c.function.arguments) for c in msg.tool_calls], only)
        reason, calls, content = _stream_tool_calls(client, **kw, temperature=t, seed=2)
        assert reason == "tool_calls" and content == ""
        _check_calls(calls, only)


@pytest.mark.slow
def test_tool_results_go_back_into_the_conversation(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=200,
                                           temperature=0)
    call = first.choices[0].message.tool_calls[0]
    follow = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 19}'}]
    r = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS,
                                       tool_choice="none", max_tokens=30, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


@pytest.mark.slow
@pytest.mark.parametrize("body,fragment", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "nosuch"}}}},
     "invalid json_schema"),
    ({"guided_regex": "(["}, "invalid regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "nope"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"functions": [{"name": "f"}]}, "functions is not supported"),
    ({"logit_bias": {"99999999": 1}}, "vocabulary"),
    ({"logit_bias": {"12": 101}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "token ids"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "one output constraint"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": "oops"}]}]}, "function"),
    ({"skip_special_tokens": False}, "skip_special_tokens is not supported"),
    ({"use_beam_search": True}, "use_beam_search is not supported"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "continuous_usage_stats"),
    ({"guided_regex": "[0-9]+", "ignore_eos": True}, "ignore_eos"),
    ({"logit_bias": {"²": 1}}, "token ids"),
])
def test_bad_constraints_and_tools_get_400_and_the_engine_goes_on(server, client, body,
                                                                   fragment):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert ok.choices[0].message.role == "assistant"
