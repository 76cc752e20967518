"""OpenAI chat requests render to the harmony prompt the cookbook specifies."""

from __future__ import annotations

import pytest

from gptoss_ray.harmony.encoding import decode
from gptoss_ray.harmony.render import RenderError, encode_text, render_chat

DATE = "2026-01-02"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def text(messages, **kw):
    kw.setdefault("start_date", DATE)
    return decode(render_chat(messages, **kw).token_ids)


def test_plain_chat_layout():
    out = text([{"role": "user", "content": "Hi"}])
    assert out.startswith("<|start|>system<|message|>")
    assert "Reasoning: medium" in out and f"Current date: {DATE}" in out
    assert "<|start|>developer" not in out  # nothing to say as developer
    assert out.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_reasoning_effort_goes_to_system_message(effort):
    out = text([{"role": "user", "content": "Hi"}], reasoning_effort=effort)
    system = out.split("<|end|>")[0]
    assert f"Reasoning: {effort}" in system


def test_system_and_developer_become_developer_instructions():
    out = text([
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hi"},
    ])
    system, developer = out.split("<|end|>")[:2]
    assert "Be brief." not in system
    assert developer.startswith("<|start|>developer<|message|># Instructions\n\nBe brief.\n\nAnswer in French.")


def test_tools_become_functions_namespace_and_tool_choice_none_hides_them():
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    out = text(msgs, tools=[WEATHER_TOOL])
    assert "Calls to these tools must go to the commentary channel: 'functions'." in out
    assert "namespace functions {" in out and "type get_weather = (_: {" in out
    assert "// Current weather in a city" in out
    hidden = text(msgs, tools=[WEATHER_TOOL], tool_choice="none")
    assert "namespace functions" not in hidden and hidden == text(msgs)


def tool_loop(reasoning_key="reasoning_content"):
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, reasoning_key: "I should call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
    ]


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_tool_round_trip_keeps_reasoning_inside_the_loop(key):
    out = text(tool_loop(key), tools=[WEATHER_TOOL])
    assert ("<|start|>assistant<|channel|>analysis<|message|>I should call the tool.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"city": "Paris"}<|call|>'
            '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>'
            "<|start|>assistant") in out
    assert out.endswith('{"temp": 20}<|end|><|start|>assistant')


def test_reasoning_before_a_final_answer_is_dropped():
    msgs = tool_loop() + [
        {"role": "assistant", "content": "It is 20C.", "reasoning_content": "Tool says 20."},
        {"role": "user", "content": "Thanks"},
    ]
    out = text(msgs, tools=[WEATHER_TOOL])
    assert "I should call the tool." not in out and "Tool says 20." not in out
    assert "<|start|>assistant<|channel|>final<|message|>It is 20C.<|end|><|start|>user<|message|>Thanks" in out
    # the call itself and its result stay
    assert "to=functions.get_weather" in out and '{"temp": 20}' in out


def test_several_tool_calls_map_results_by_id():
    msgs = [
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "b", "content": "noon"},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
    ]
    out = text(msgs, tools=[WEATHER_TOOL])
    assert out.count("<|call|>") == 2
    assert "<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>noon<|end|>" in out
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>" in out


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], "messages[0].tool_call_id"),
])
def test_bad_requests_name_the_parameter(messages, param):
    with pytest.raises(RenderError) as e:
        render_chat(messages, start_date=DATE)
    assert e.value.param == param


def test_bad_reasoning_effort():
    with pytest.raises(RenderError) as e:
        render_chat([{"role": "user", "content": "x"}], reasoning_effort="max")
    assert e.value.param == "reasoning_effort"


def test_completions_text_keeps_special_tokens():
    ids = encode_text("<|start|>user<|message|>Hi")
    assert ids[0] == 200006 and decode(ids) == "<|start|>user<|message|>Hi"
