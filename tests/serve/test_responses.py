"""/v1/responses on a live Serve app over the scripted engine, driven by the official
openai client and the openai-agents SDK.

The scripted engine replays known harmony token streams (`[[script:NAME]]` in the prompt
picks one; serve/testing.py), so reasoning, tool-call and final sequences are exact, and
it records the prompt token ids the server rendered, so continuation and harmony's
reasoning rules are checked on the tokens themselves.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from gptoss_ray.harmony.encoding import decode, get_encoding
from gptoss_ray.serve.testing import SCRIPTS, local_serve_app

pytestmark = pytest.mark.timeout(300)
MODEL = "gpt-oss-scripted"
MAX_LEN = 2048
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                          "required": ["city", "unit"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    store = tmp_path_factory.mktemp("responses") / "store.sqlite3"
    args = {"engine_cls": "gptoss_ray.serve.testing:ScriptedEngine", "served_model_name": MODEL,
            "engine": {"max_model_len": MAX_LEN}, "responses_store": f"sqlite:///{store}"}
    with local_serve_app(args, app_name="gptoss") as url:
        from ray import serve

        yield url, serve.get_deployment_handle("LLMServer", app_name="gptoss")


def make_client(app, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=app[0] + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def client(app):
    return make_client(app)


def debug(app, name):
    return app[1].debug.remote(name).result()


def last_prompt(app) -> list[int]:
    return debug(app, "prompts")[-1]["prompt_token_ids"]


def script_tokens(name: str) -> list[int]:
    return get_encoding().encode(SCRIPTS[name], allowed_special="all")


# --- create, streamed and not ---------------------------------------------------------


def test_reasoning_then_message(client, app):
    r = client.responses.create(model=MODEL, input="2+2? [[script:reasoning_final]]")
    assert r.status == "completed" and r.object == "response"
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Two plus two is four."
    assert r.output_text == "The answer is 4."
    assert r.usage.input_tokens == len(last_prompt(app))
    assert r.usage.output_tokens == len(script_tokens("reasoning_final"))
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_streamed_events_in_openai_order(client):
    events = list(client.responses.create(model=MODEL, input="2+2? [[script:reasoning_final]]", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]  # deltas repeat
    assert collapsed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (reasoning, text) == ("Two plus two is four.", "The answer is 4.")
    final = events[-1].response
    assert final.output_text == text and final.status == "completed"
    assert {e.item_id for e in events if e.type == "response.output_text.delta"} == {final.output[1].id}


def test_stream_helper_and_retrieve_agree(client):
    with client.responses.stream(model=MODEL, input="2+2? [[script:reasoning_final]]") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "The answer is 4."
    stored = client.responses.retrieve(final.id)
    assert stored.model_dump(exclude={"output"}) == final.model_dump(exclude={"output"})  # the helper adds `parsed`
    assert [o.id for o in stored.output] == [o.id for o in final.output] and stored.output_text == final.output_text


def test_streamed_tool_call_arguments(client):
    events = list(client.responses.create(model=MODEL, input="weather? [[script:tool_call]]", tools=[WEATHER],
                                          stream=True))
    (call,) = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris", "unit": "celsius"})
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta" and e.item_id == call.id]
    done = [e for e in events if e.type == "response.function_call_arguments.done" and e.item_id == call.id]
    assert len(pieces) > 1 and "".join(pieces) == done[0].arguments == call.arguments
    assert call.call_id.startswith("call_") and events[-1].response.output[-1].call_id == call.call_id


def test_logprobs_of_the_output_text(client):
    r = client.responses.create(model=MODEL, input="2+2? [[script:reasoning_final]]", top_logprobs=2,
                                include=["message.output_text.logprobs"])
    logprobs = r.output[1].content[0].logprobs
    assert "".join(lp.token for lp in logprobs) == "The answer is 4."  # the message's tokens only
    assert all(len(lp.top_logprobs) == 2 and lp.logprob == -0.5 for lp in logprobs)
    plain = client.responses.create(model=MODEL, input="2+2? [[script:reasoning_final]]")
    assert not plain.output[1].content[0].logprobs


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model=MODEL, input="count [[script:stop_mid_channel]]", max_output_tokens=12)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 12 and r.output[-1].status == "incomplete"


def test_sampling_knobs_reach_the_engine(client, app):
    client.responses.create(model=MODEL, input="hi", temperature=0.3, top_p=0.9, max_output_tokens=50,
                            extra_body={"seed": 7})  # gpt-oss's knob; OpenAI's Responses API has no seed
    params = debug(app, "prompts")[-1]["params"]
    assert (params["temperature"], params["top_p"], params["seed"], params["max_tokens"]) == (0.3, 0.9, 7, 50)


@pytest.mark.parametrize("extra, needle", [
    ({"tools": [WEATHER], "tool_choice": "required"}, "get_weather"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}, "get_weather"),
    ({"text": {"format": {"type": "json_schema", "name": "verdict", "strict": True, "schema": {
        "type": "object", "properties": {"guilty": {"type": "boolean"}}, "required": ["guilty"]}}}}, "guilty"),
])
def test_forced_tools_and_json_schema_reach_the_engine_as_a_grammar(client, app, extra, needle):
    r = client.responses.create(model=MODEL, input="hi", **extra)
    grammar = debug(app, "prompts")[-1]["params"]["grammar"]
    assert grammar and needle in grammar
    if "text" in extra:
        assert r.text.format.type == "json_schema" and r.text.format.name == "verdict"
    plain = client.responses.create(model=MODEL, input="hi", tools=[{**WEATHER, "strict": False}])
    assert debug(app, "prompts")[-1]["params"]["grammar"] is None and plain.status == "completed"


def test_instructions_and_reasoning_effort_are_rendered(client, app):
    client.responses.create(model=MODEL, input="hi", instructions="Answer in French.", reasoning={"effort": "high"})
    prompt = decode(last_prompt(app))
    assert "Reasoning: high" in prompt and "Answer in French." in prompt


# --- conversations ---------------------------------------------------------------------


def test_tool_loop_through_previous_response_id(client, app):
    first = client.responses.create(model=MODEL, input="Weather in Paris? [[script:tool_call]]", tools=[WEATHER])
    prompt1 = last_prompt(app)
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21C [[script:after_tool]]"}])
    assert second.output_text == "It is 21C in Paris." and second.previous_response_id == first.id
    prompt2 = last_prompt(app)
    # the continuation renders the first turn exactly as it was generated: a prefix-cache hit
    assert prompt2[:len(prompt1) + first.usage.output_tokens] == prompt1 + script_tokens("tool_call")
    text2 = decode(prompt2)
    assert "I need the weather tool." in text2  # analysis kept between a call and its output
    assert "functions.get_weather to=assistant" in text2 and "21C" in text2
    third = client.responses.create(model=MODEL, previous_response_id=second.id, input="Thanks!", tools=[WEATHER])
    text3 = decode(last_prompt(app))
    assert third.status == "completed"
    assert "It is 21C in Paris." in text3 and '{"city": "Paris", "unit": "celsius"}' in text3
    assert "I need the weather tool." not in text3 and "The tool said 21C." not in text3  # dropped after a final


def test_input_items_retrieve_delete(client):
    r = client.responses.create(model=MODEL, input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    items = client.responses.input_items.list(r.id, order="asc")
    assert [(i.type, i.role) for i in items.data] == [("message", "developer"), ("message", "user")]
    assert items.data[1].content[0].text == "hi"
    page = client.responses.input_items.list(r.id, limit=1)  # desc by default: newest first
    assert [i.role for i in page.data] == ["user"] and page.has_more
    assert client.responses.retrieve(r.id).output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_store_false_is_not_retrievable(client):
    r = client.responses.create(model=MODEL, input="hi", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_another_key_gets_404(client, app):
    r = client.responses.create(model=MODEL, input="hi", metadata={"k": "v"})
    other = make_client(app, key="key-b")
    for call in (lambda: other.responses.retrieve(r.id), lambda: other.responses.delete(r.id),
                 lambda: other.responses.input_items.list(r.id),
                 lambda: other.responses.create(model=MODEL, input="more", previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.responses.retrieve(r.id).metadata == {"k": "v"}


def test_truncation_auto_drops_the_oldest_turns(client, app):
    long = "word " * 700  # ~700 tokens a turn; three turns exceed 2048
    r = client.responses.create(model=MODEL, input=f"first {long}")
    for n in range(2):
        r = client.responses.create(model=MODEL, input=f"turn{n} {long}", previous_response_id=r.id,
                                    truncation="auto")
        assert r.status == "completed"
    prompt = decode(last_prompt(app))
    assert "turn1" in prompt and "first" not in prompt and len(last_prompt(app)) < MAX_LEN
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=f"again {long}", previous_response_id=r.id)
    assert e.value.code == "context_length_exceeded"


def test_background_and_cancel(client, app):
    done = client.responses.create(model=MODEL, input="hi [[script:reasoning_final]]", background=True)
    assert done.status in ("queued", "in_progress") and done.background
    for _ in range(1200):  # up to a minute on a loaded machine
        got = client.responses.retrieve(done.id)
        if got.status == "completed":
            break
        time.sleep(0.05)
    assert got.output_text == "The answer is 4."
    slow = client.responses.create(model=MODEL, input="think [[script:slow]]", background=True)
    cancelled = client.responses.cancel(slow.id)
    assert cancelled.status == "cancelled"
    for _ in range(1200):  # up to a minute on a loaded machine
        if slow.id in debug(app, "aborted"):
            break
        time.sleep(0.05)
    assert slow.id in debug(app, "aborted")  # the engine stopped generating it
    assert client.responses.retrieve(slow.id).status == "cancelled"
    deleted = client.responses.create(model=MODEL, input="think [[script:slow]]", background=True)
    client.responses.delete(deleted.id)  # deleting a running response stops it, and it stays deleted
    for _ in range(1200):  # up to a minute on a loaded machine
        if deleted.id in debug(app, "aborted"):
            break
        time.sleep(0.05)
    assert deleted.id in debug(app, "aborted")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(deleted.id)


def test_engine_failure_is_an_error_event_then_failed(client):
    events = list(client.responses.create(model=MODEL, input="x [[script:error]]", stream=True))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "engine_error" and events[-1].response.error.code == "engine_error"
    assert client.responses.retrieve(events[-1].response.id).status == "failed"
    with pytest.raises(openai.InternalServerError) as e:
        client.responses.create(model=MODEL, input="x [[script:error]]")
    assert e.value.code == "engine_error"


# --- bad input: OpenAI's envelope, 4xx, the parameter named -------------------------------


@pytest.mark.parametrize("body, status, param, needle", [
    ({"input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id", "not found"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400, "input[0].call_id",
     "call_x"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type", "web_search"),
    ({"input": "hi", "tools": [{"type": "mcp", "server_label": "x", "server_url": "http://x"}]}, 400,
     "tools[0].type", "mcp"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice",
     "nope"),
    ({"input": "hi", "tool_choice": "required"}, 400, "tool_choice", "no function tools"),
    ({"input": "hi", "tool_choice": {"type": "web_search"}}, 400, "tool_choice", "web_search"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"enum": list(range(5000))}}}},
     400, "text.format.schema", ""),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, "input[0].type", "input_image"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input[0].content[0]", "input_image"),
    ({"input": [{"role": "tool", "content": "x"}]}, 400, "input[0].role", "tool"),
    ({"input": "hi", "max_output_tokens": 10 ** 6}, 400, "max_output_tokens", "context length"),
    ({"input": "hi", "temperature": 3}, 400, "temperature", ""),
    ({"input": "hi", "background": True, "store": False}, 400, "background", "stored"),
    ({"input": 5}, 400, "input", ""),
    ({}, 400, "input", "missing"),
    ({"input": "hi", "max_output_tokens": "5"}, 400, "max_output_tokens", ""),
    ({"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata", "16"),
])
def test_bad_input_is_a_4xx_naming_the_field(app, body, status, param, needle):
    r = httpx.post(app[0] + "/v1/responses", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"]


def test_lone_surrogate_is_a_400(app):
    raw = '{"model": "%s", "input": "hi \\ud800"}' % MODEL  # valid JSON, not valid Unicode text
    r = httpx.post(app[0] + "/v1/responses", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_unknown_response_routes_are_404(app):
    for method, path in (("GET", "/v1/responses/resp_x"), ("DELETE", "/v1/responses/resp_x"),
                         ("GET", "/v1/responses/resp_x/input_items"), ("POST", "/v1/responses/resp_x/cancel")):
        r = httpx.request(method, app[0] + path, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


def test_metrics_count_responses_and_the_store(app, client):
    client.responses.create(model=MODEL, input="hi")
    text = httpx.get(app[0] + "/metrics", timeout=30).text
    for name in ("vllm:request_success_total", "vllm:e2e_request_latency_seconds_count",
                 "vllm:time_to_first_token_seconds_count"):
        assert any(line.startswith(name) and 'endpoint="responses"' in line for line in text.splitlines()), name
    size = [line for line in text.splitlines() if line.startswith("gptoss:responses_store_size{")]
    assert size and float(size[0].split()[-1]) > 0


# --- the openai-agents SDK with its default settings -----------------------------------


def test_agents_sdk_runs_a_tool_to_completion(app, monkeypatch):
    """Default Agent and Runner (Responses API, default client from the environment),
    non-streamed then streamed, in one event loop as an application would run them."""
    monkeypatch.setenv("OPENAI_BASE_URL", app[0] + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "agents-key")
    import agents

    agents.set_tracing_disabled(True)  # its exporter would call api.openai.com; nothing else changed
    calls = []

    @agents.function_tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city."""
        calls.append((city, unit))
        return "21C [[script:after_tool]]"

    agent = agents.Agent(name="weather", instructions="Use the tool.", model=MODEL, tools=[get_weather])
    question = "Weather in Paris? [[script:tool_call]]"

    async def run():
        plain = await agents.Runner.run(agent, question)
        streamed = agents.Runner.run_streamed(agent, question)
        kinds = [e.type async for e in streamed.stream_events()]
        return plain, streamed, kinds

    plain, streamed, kinds = asyncio.run(run())
    assert calls == [("Paris", "celsius")] * 2
    assert plain.final_output == streamed.final_output == "It is 21C in Paris."
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
