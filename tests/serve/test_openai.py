"""A live local Serve app over the scripted engine, driven by the official openai client.

The scripted engine (gptoss_ray/serve/testing.py) replays known harmony token streams,
chosen per request by a `[[script:NAME]]` marker in the prompt, through the real
ingress -> LLMServer path; it records the prompt token ids the server sent.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from support.scripted import scripted_app, sdk_client

from gptoss_ray.harmony.encoding import decode, get_encoding
from gptoss_ray.harmony.render import render_chat
from gptoss_ray.serve.testing import SCRIPTS

pytestmark = pytest.mark.timeout(300)
MODEL = "gpt-oss-scripted"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def app():
    with scripted_app(MODEL, "gptoss") as app:
        yield app


@pytest.fixture
def client(app):
    return sdk_client(app[0])


def debug(app, name):
    return app[1].debug.remote(name).result()


def script_len(name: str) -> int:
    return len(get_encoding().encode(SCRIPTS[name], allowed_special="all"))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- parsing through the server -------------------------------------------------------


def test_reasoning_and_final(client, app):
    r = client.chat.completions.create(model=MODEL, messages=user("2+2? [[script:reasoning_final]]"))
    msg = r.choices[0].message
    assert msg.content == "The answer is 4."
    assert msg.reasoning_content == msg.reasoning == "Two plus two is four."
    assert r.choices[0].finish_reason == "stop" and not msg.tool_calls
    prompt = debug(app, "prompts")[-1]["prompt_token_ids"]
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == script_len("reasoning_final")
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_reasoning_then_content_with_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=user("2+2? [[script:reasoning_final]]"), stream=True,
        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("Two plus two is four.", "The answer is 4.")
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas if d.content or getattr(d, "reasoning_content", None)]
    assert kinds == sorted(kinds, reverse=True) and len(kinds) > 2  # all reasoning before any content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == script_len("reasoning_final")


def test_tool_call_round_trip(client, app):
    tools = [WEATHER]
    r = client.chat.completions.create(model=MODEL, messages=user("Weather in Paris? [[script:tool_call]]"), tools=tools)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # the same call, streamed: the SDK reassembles the argument pieces
    with client.chat.completions.stream(model=MODEL, messages=user("Weather? [[script:tool_call]]"), tools=tools) as s:
        pieces = [e for e in s if e.type == "tool_calls.function.arguments.delta"]
        final = s.get_final_completion()
    assert len(pieces) > 1
    (scall,) = final.choices[0].message.tool_calls
    assert json.loads(scall.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert final.choices[0].finish_reason == "tool_calls"
    # send the result back: the next prompt carries call and result as harmony messages
    history = user("Weather in Paris?") + [
        {"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
         "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21} [[script:after_tool]]'},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=tools)
    assert r2.choices[0].message.content == "It is 21C in Paris." and r2.choices[0].finish_reason == "stop"
    prompt = decode(debug(app, "prompts")[-1]["prompt_token_ids"])
    assert ("<|start|>assistant<|channel|>analysis<|message|>I need the weather tool.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"city": "Paris", "unit": "celsius"}<|call|>'
            '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp_c": 21}') in prompt


def test_several_calls_across_turns(client):
    history = user("Weather and time in Paris? [[script:tool_call]]")
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME])
    calls = list(r.choices[0].message.tool_calls)
    history += [{"role": "assistant", "tool_calls": [c.model_dump() for c in calls]},
                {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny [[script:two_calls]]"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME])
    # the engine stops at the first <|call|>, as gpt-oss does: one call per turn
    (call2,) = r.choices[0].message.tool_calls
    assert call2.function.name == "get_weather" and call2.id != calls[0].id
    assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("script, content", [
    ("malformed", "garbled text without a header"),
    ("plain", "Just plain text, no harmony at all."),
])
def test_malformed_output_is_content_not_500(client, script, content):
    r = client.chat.completions.create(model=MODEL, messages=user(f"x [[script:{script}]]"))
    assert r.choices[0].message.content == content
    chunks = client.chat.completions.create(model=MODEL, messages=user(f"x [[script:{script}]]"), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content


def test_stop_mid_channel_returns_what_was_parsed(client):
    r = client.chat.completions.create(model=MODEL, messages=user("count [[script:stop_mid_channel]]"))
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "one two three four five six seven"
    r = client.chat.completions.create(model=MODEL, messages=user("count [[script:stop_mid_channel]]"), max_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert r.choices[0].message.reasoning_content and not r.choices[0].message.content


def test_stop_string_trims_content(client):
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=user("x [[script:stop_string]]"), stop=["STOP"],
                                           stream=stream)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        else:
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop"
        assert text == "alpha beta "


def test_n_samples_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=user("hi"), n=2, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == "Hello from the scripted engine!" for c in r.choices)
    entries = r.choices[0].logprobs.content
    # logprobs.content covers the reply's text tokens only, not reasoning or harmony control tokens
    assert "".join(e.token for e in entries) == "Hello from the scripted engine!"
    assert len(entries) < script_len("default") and entries[0].logprob == -0.5
    assert len(entries[0].top_logprobs) == 2 and r.usage.completion_tokens == 2 * script_len("default")
    streamed = client.chat.completions.create(model=MODEL, messages=user("hi"), logprobs=True, stream=True)
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert "".join(tokens) == "Hello from the scripted engine!"


# --- the prompt the server used -------------------------------------------------------


def test_reasoning_effort_and_tools_change_the_prompt_as_harmony_says(client, app):
    msgs = [{"role": "system", "content": "Be brief."}] + user("hi")
    seen = {}
    for key, extra in {"low": {"reasoning_effort": "low"}, "high": {"reasoning_effort": "high"},
                       "default": {}, "tools": {"tools": [WEATHER]}}.items():
        client.chat.completions.create(model=MODEL, messages=msgs, **extra)
        seen[key] = debug(app, "prompts")[-1]["prompt_token_ids"]
        expected = render_chat(msgs, tools=extra.get("tools"), reasoning_effort=extra.get("reasoning_effort", "medium"))
        assert seen[key] == expected.token_ids
    assert "Reasoning: low" in decode(seen["low"]) and "Reasoning: high" in decode(seen["high"])
    assert "Reasoning: medium" in decode(seen["default"])
    assert "namespace functions" in decode(seen["tools"]) and "namespace functions" not in decode(seen["default"])
    assert "# Instructions\n\nBe brief." in decode(seen["default"])


# --- other endpoints ------------------------------------------------------------------


def test_completions_text_and_token_ids(client, app):
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.choices[0].text == "analysisThe user"  # special tokens skipped, like vLLM
    assert debug(app, "prompts")[-1]["prompt_token_ids"] == get_encoding().encode("Once upon")
    r = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, logprobs=1)
    assert r.usage.prompt_tokens == 3 and len(r.choices[0].logprobs.tokens) == 3
    chunks = list(client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts[0] == texts[1] == "analysisThe" and chunks[-1].usage.completion_tokens == 8


def test_echo_with_logprobs_returns_the_prompts_logprobs(client, app):
    """lm-eval-harness's loglikelihood request: echo, logprobs, max_tokens 0. The scripted
    engine gives each prompt token -1 (and the next token id -2)."""
    ids = get_encoding().encode("Hello big world")
    r = client.completions.create(model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=0)
    sent = debug(app, "prompts")[-1]["params"]
    assert sent["prompt_logprobs"] == 1 and sent["max_tokens"] == 1  # one token sampled, then left out
    (choice,) = r.choices
    assert choice.text == "Hello big world" and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == [decode([t]) for t in ids]
    assert lp.token_logprobs == [None, -1.0, -1.0] and lp.top_logprobs[0] is None
    assert lp.top_logprobs[1:] == [{decode([t]): -1.0} for t in ids[1:]]
    assert lp.text_offset == [0, len("Hello"), len("Hello big")]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 0
    # with output: the prompt's entries, then the generated tokens'
    r = client.completions.create(model=MODEL, prompt="Hello big world", echo=True, logprobs=0, max_tokens=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("Hello big world") and r.usage.completion_tokens == 3
    assert lp.token_logprobs == [None, -1.0, -1.0, -0.5, -0.5, -0.5] and len(lp.tokens) == 6
    assert lp.text_offset[3] == len("Hello big world")
    # echo alone asks for no prompt logprobs; streamed, the prompt comes first
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", echo=True, max_tokens=2, stream=True))
    assert debug(app, "prompts")[-1]["params"]["prompt_logprobs"] is None
    assert chunks[0].choices[0].text.startswith("Hello") and "".join(c.choices[0].text for c in chunks) == \
        "Hello" + "analysis"


def test_max_tokens_zero_needs_echo(app):
    r = raw(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_models(client, app):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.model_extra["max_model_len"] == 2048


# --- errors: status, envelope, and the server keeps answering -----------------------


def raw(app, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, app[0] + path, timeout=30, **kw)


GOOD = {"model": MODEL, "messages": user("hi")}


@pytest.mark.parametrize("kw, status, param", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
    ({"json": [1, 2]}, 400, None),
    ({"json": {**GOOD, "messages": []}}, 400, "messages"),
    ({"json": {**GOOD, "temperature": "hot"}}, 400, "temperature"),
    ({"json": {**GOOD, "temperature": 3.5}}, 400, "temperature"),
    ({"json": {**GOOD, "n": 0}}, 400, "n"),
    ({"json": {**GOOD, "top_logprobs": 50, "logprobs": True}}, 400, "top_logprobs"),
    ({"json": {**GOOD, "messages": [{"role": "user"}], "max_tokens": 4000}}, 400, "max_tokens"),
    ({"json": {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}}, 400, "messages[0].role"),
    ({"json": {**GOOD, "tool_choice": "required"}}, 400, "tool_choice"),  # nothing to call
    ({"json": {**GOOD, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}},
     400, "tool_choice"),
    ({"json": {**GOOD, "response_format": {"type": "json_schema"}}}, 400, "response_format.json_schema"),
    ({"json": {**GOOD, "model": "gpt-5"}}, 404, "model"),
])
def test_bad_requests(app, kw, status, param):
    r = raw(app, "POST", "/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert "Traceback" not in r.text and ".py" not in r.text
    assert raw(app, "POST", "/v1/chat/completions", json=GOOD).status_code == 200


def test_context_length_message_gives_both_numbers(app):
    r = raw(app, "POST", "/v1/chat/completions", json={**GOOD, "max_tokens": 2040})
    assert r.status_code == 400 and "2048" in r.json()["error"]["message"] and "2040" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nope", 404), ("DELETE", "/v1/models", 405),
                                                  ("GET", "/v1/chat/completions", 405)])
def test_unknown_routes_and_methods(app, method, path, status):
    r = raw(app, method, path)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_engine_error_before_and_after_streaming_began(client, app):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=user("x [[script:error]]"))
    # the engine's own text stays in the server log: no exception message or type name in a body
    assert "engine error" in str(e.value) and "scripted engine failure" not in str(e.value)
    assert "Traceback" not in str(e.value)
    r = raw(app, "POST", "/v1/chat/completions", json={**GOOD, "messages": user("x [[script:error]]"), "stream": True})
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2][6:])["error"]["message"].startswith("engine error") and events[-1] == "data: [DONE]"
    assert "scripted engine failure" not in r.text
    assert client.chat.completions.create(model=MODEL, messages=user("hi")).choices[0].message.content


# --- disconnects and metrics ----------------------------------------------------------


def wait_for(predicate, what: str, deadline_s: float = 60.0):
    """Poll until true (not a timing assertion: the deadline only bounds a hang)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"never happened: {what}")


def test_disconnect_mid_stream_aborts(app):
    body = {**GOOD, "messages": user("think long [[script:slow]]"), "stream": True}
    with httpx.stream("POST", app[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = [next(lines) for _ in range(6)]
    request_id = json.loads(next(x for x in first if x.startswith("data: "))[6:])["id"]
    wait_for(lambda: request_id in debug(app, "aborted"), "engine.abort after the client left")
    assert request_id not in debug(app, "finished")
    stats = app[1].stats.remote().result()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


def test_disconnect_while_waiting_for_a_whole_reply_aborts(app):
    body = {**GOOD, "messages": user("think long [[script:slow]]")}
    before = set(debug(app, "aborted"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(app[0] + "/v1/chat/completions", json=body, timeout=1.0)
    aborted = wait_for(lambda: set(debug(app, "aborted")) - before, "abort of the non-streaming request")
    assert len(aborted) == 1


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_move(client, app):
    before = raw(app, "GET", "/metrics").text
    client.chat.completions.create(model=MODEL, messages=user("hi"))
    after = raw(app, "GET", "/metrics").text
    n = script_len("default")
    assert metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == n
    stop = 'vllm:request_success_total{endpoint="chat",finished_reason="stop"'  # the endpoint label
    assert metric(after, stop) == metric(before, stop) + 1
    assert metric(after, "vllm:time_to_first_token_seconds_count") > metric(before, "vllm:time_to_first_token_seconds_count")
    assert metric(after, "vllm:prompt_tokens_total") > metric(before, "vllm:prompt_tokens_total")
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "gptoss:expert_load_tokens",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:inter_token_latency_seconds_bucket"):
        assert name in after


def test_health(app):
    r = raw(app, "GET", "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
