"""Structured outputs and forced tool calls through the real Serve app, the real engine and the
random-weight demo model (so only the grammar makes replies valid), with the official openai
client and LangChain. One server for the module; small max_tokens and reasoning budgets."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from support.schemas import SCHEMAS

from gptoss_ray.harmony import grammar as hg
from gptoss_ray.harmony.guidance import GrammarError, check
from gptoss_ray.serve.testing import local_serve_app

pytestmark = [pytest.mark.timeout(600)]
MODEL = "gpt-oss-tiny-demo"
MESSAGES = [{"role": "user", "content": "Reply in JSON."}]
BUDGET = {"max_reasoning_tokens": 6}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
# a spread of the shared schemas (the engine test and the slow sweep run all of them)
SERVE_SCHEMAS = [SCHEMAS[i] for i in (0, 5, 9, 13, 15, 17, 24, 27, 30)] + SCHEMAS[-5:-3]


class Verdict(BaseModel):
    kind: Literal["ok", "bad"]
    score: int = Field(ge=0, le=9)
    flag: bool
    note: str


@pytest.fixture(scope="module")
def url():
    from gptoss_ray.checkpoint import default_demo_checkpoint

    engine = {"model": str(default_demo_checkpoint()), "dtype": "float32", "device": "cpu", "block_size": 16,
              "num_kv_blocks": 512, "max_model_len": 2048, "max_num_seqs": 16, "worker_num_cpus": 0.1}
    with local_serve_app({"engine": engine, "served_model_name": MODEL, "structured_max_string_length": 12},
                         app_name="structured") as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def test_chat_json_schema_streamed_and_not(client):
    stopped, with_reasoning = 0, 0
    for i, schema in enumerate(SERVE_SCHEMAS):
        kw = dict(model=MODEL, messages=MESSAGES, max_tokens=80, temperature=1.0, seed=i,
                  response_format=_json_format(schema), extra_body=BUDGET)
        if i % 2:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                                for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            choice = client.chat.completions.create(**kw).choices[0]
            content, finish = choice.message.content, choice.finish_reason
            reasoning = getattr(choice.message, "reasoning_content", None) or ""
        if finish == "stop":
            stopped += 1
            jsonschema.validate(json.loads(content), schema)
            with_reasoning += bool(reasoning)  # the analysis is optional, but it arrives where written
    assert stopped >= len(SERVE_SCHEMAS) * 2 // 3 and with_reasoning > 0


def test_json_object_and_completions_response_format(client, url):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=80, temperature=0.0,
                                       response_format={"type": "json_object"}, extra_body=BUDGET)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = SCHEMAS[13]
    fmt = {"response_format": _json_format(schema)}
    done = client.completions.create(model=MODEL, prompt="Colors:", max_tokens=40, temperature=1.0, seed=3,
                                     extra_body=fmt)
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].text), schema)
    chunks = list(client.completions.create(model=MODEL, prompt="Colors:", max_tokens=40, temperature=1.0, seed=3,
                                            stream=True, extra_body=fmt))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls(client, tool_choice):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                           max_tokens=64, temperature=1.0, seed=seed, extra_body=BUDGET)
        choice = r.choices[0]
        assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0].function
        if isinstance(tool_choice, dict):
            assert call.name == "add"
        if choice.finish_reason == "tool_calls":
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), schema)
        else:
            assert choice.finish_reason == "length"


def test_openai_parse_returns_the_pydantic_object(client):
    r = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Verdict, max_tokens=64,
                                      temperature=0.0, extra_body=BUDGET)
    msg = r.choices[0].message
    assert isinstance(msg.parsed, Verdict) and msg.refusal is None
    assert Verdict.model_validate_json(msg.content) == msg.parsed


def test_langchain_with_structured_output(url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=url + "/v1", api_key="unused", max_retries=0, temperature=0.0,
                     max_tokens=64, extra_body=BUDGET)
    out = llm.with_structured_output(Verdict, method="json_schema").invoke("Judge this.")
    assert isinstance(out, Verdict)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/none"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["a"]}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "enum": list(range(5000))}}}}, "response_format.json_schema.schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}, "max_tokens": 8, "max_reasoning_tokens": 8},
     "max_reasoning_tokens"),
])
def test_unservable_requests_are_400s_naming_the_problem(url, body, param):
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_responses_grammar_shapes_compile():
    # the function the /v1/responses handler calls: flat tools and text.format
    tools = [{"type": "function", "name": "add", "parameters": TOOLS[1]["function"]["parameters"], "strict": True}]
    for fmt, choice in [({"type": "json_schema", "name": "v", "schema": Verdict.model_json_schema()}, "auto"),
                        (None, "required"), (None, {"type": "function", "name": "add"}), (None, "auto")]:
        g = hg.responses_grammar(fmt, tools, choice, 64)
        assert g is not None
        check(g)
    assert hg.responses_grammar({"type": "text"}, None, "auto", 64) is None
    with pytest.raises(GrammarError):
        hg.responses_grammar(None, tools, {"type": "function", "name": "other"}, 64)


def test_logprobs_of_tokens_the_grammar_masks_are_finite(client):
    # After "true"/"false" only <|return|> is allowed: the other top tokens have -inf logprobs,
    # which JSON cannot carry (a 500 before they were clamped to vLLM's floor).
    r = client.completions.create(model=MODEL, prompt="Yes?", max_tokens=8, temperature=0.0, logprobs=5,
                                  extra_body={"response_format": _json_format({"type": "boolean"})})
    assert r.choices[0].text in ("true", "false")
    assert any(lp == -9999.0 for top in r.choices[0].logprobs.top_logprobs for lp in top.values())
