"""The incremental harmony parser: channels, tool calls, malformed output, which tokens are content.

Stop strings are the output processor's (tests/output/)."""

from __future__ import annotations

import json
import logging

import pytest

from gptoss_ray.harmony.encoding import get_encoding
from gptoss_ray.harmony.parse import HarmonyStreamParser, parse_completion


def ids(text: str) -> list[int]:
    return get_encoding().encode(text, allowed_special="all")


def stream(text: str):
    """Feed one token at a time, as the engine delivers them; return parser and deltas."""
    parser = HarmonyStreamParser()
    deltas = []
    for t in ids(text):
        deltas += parser.feed([t])
    deltas += parser.finish()
    return parser, deltas


def joined(deltas, kind):
    return "".join(d.text for d in deltas if d.kind == kind)


def test_reasoning_then_final():
    p, deltas = stream("<|channel|>analysis<|message|>Let me think.<|end|>"
                       "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>")
    assert (p.reasoning, p.content, p.tool_calls, p.malformed) == ("Let me think.", "Hello there!", [], False)
    assert joined(deltas, "reasoning") == p.reasoning and joined(deltas, "content") == p.content
    # reasoning streams before content
    assert [d.kind for d in deltas].index("content") > max(i for i, d in enumerate(deltas) if d.kind == "reasoning")
    assert 0 < p.num_reasoning_tokens < p.num_tokens


def test_tool_calls_stream_start_then_argument_pieces():
    text = ("<|channel|>analysis<|message|>Two cities.<|end|>"
            '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
            '<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{"city": "Rome"}<|call|>')
    p, deltas = stream(text)
    assert [(c.name, json.loads(c.arguments)) for c in p.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome"})]
    assert len({c.id for c in p.tool_calls}) == 2 and all(c.id.startswith("call_") for c in p.tool_calls)
    calls = [d for d in deltas if d.kind == "tool_call"]
    starts = [d for d in calls if d.tool_id]
    assert [(d.tool_index, d.tool_name) for d in starts] == [(0, "get_weather"), (1, "get_time")]
    for i, call in enumerate(p.tool_calls):
        pieces = [d.text for d in calls if d.tool_index == i and not d.tool_id]
        assert len(pieces) > 1 and "".join(pieces) == call.arguments
    assert p.content == ""


def test_whole_and_streamed_parse_agree():
    text = "<|channel|>analysis<|message|>a b c<|end|><|start|>assistant<|channel|>final<|message|>d e f<|return|>"
    whole = parse_completion(ids(text))
    p, _ = stream(text)
    assert (whole.reasoning, whole.content) == (p.reasoning, p.content)


@pytest.mark.parametrize("text, content", [
    ("Hello, no header at all", "Hello, no header at all"),
    ("<|channel|>analysis<|message|>x<|end|>garbage after end<|return|>", "garbage after end"),
    (" ".join(["word"] * 60), " ".join(["word"] * 60)),
])
def test_malformed_output_becomes_content_with_a_warning(text, content, caplog):
    with caplog.at_level(logging.WARNING, logger="gptoss_ray.harmony.parse"):
        p, deltas = stream(text)
    assert p.malformed and p.content == content and joined(deltas, "content") == content
    assert "returning the generated text as content" in caplog.text


def test_parsing_resumes_after_garbage_at_next_start():
    p, _ = stream("<|channel|>analysis<|message|>x<|end|>junk<|start|>assistant<|channel|>final<|message|>ok<|return|>")
    assert p.malformed and p.reasoning == "x" and p.content == "junkok"


@pytest.mark.parametrize("text, reasoning, content, args", [
    ("<|channel|>analysis<|message|>half a thou", "half a thou", "", None),
    ("<|channel|>analysis<|message|>r<|end|><|start|>assistant<|channel|>final<|message|>part", "r", "part", None),
    ('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": ', "", "", '{"a": '),
    ("<|channel|>analysis<|message|>r<|end|><|start|>assistant<|channel|>fin", "r", "", None),
])
def test_stop_mid_channel_keeps_what_was_parsed(text, reasoning, content, args):
    p, _ = stream(text)
    assert (p.reasoning, p.content, p.malformed) == (reasoning, content, False)
    assert (p.tool_calls[0].arguments if p.tool_calls else None) == args


def content_tokens(p, text):
    return [t for t, flag in zip(ids(text), p.token_is_content) if flag]


def test_token_is_content_marks_the_final_channel_only():
    text = "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>Hi there<|return|>"
    p, _ = stream(text)
    assert None not in p.token_is_content and len(p.token_is_content) == len(ids(text))
    assert content_tokens(p, text) == ids("Hi there")


@pytest.mark.parametrize("text, content", [
    # no header at all: past MAX_HEADER_TOKENS the header tokens turn out to be the reply
    (" ".join(["word"] * 60), " ".join(["word"] * 60)),
    # short plain text ended by a stop token while a header was expected
    ("Just plain text.<|return|>", "Just plain text."),
    # a header that is none (harmony reads stray words as a recipient): its words are content
    ("<|channel|>analysis<|message|>ok<|end|><|start|>assistant garbled text <|message|> more<|return|>",
     " garbled text  more"),
])
def test_header_tokens_that_turn_out_to_be_text_are_content(text, content):
    p, _ = stream(text)
    assert None not in p.token_is_content
    assert "".join(get_encoding().decode([t]) for t in content_tokens(p, text)) == content


def test_header_tokens_wait_for_the_header_to_end():
    p, n = HarmonyStreamParser(), len(ids("word " * 10))
    p.feed(ids("word " * 10))
    assert p.token_is_content == [None] * n  # a header or the reply: not known yet
    p.finish()
    assert p.token_is_content == [True] * n


def test_multibyte_text_is_never_split():
    p, deltas = stream("<|channel|>final<|message|>héllo 日本語 🎉<|return|>")
    assert p.content == "héllo 日本語 🎉" and all("\ufffd" not in d.text for d in deltas)


@pytest.mark.parametrize("text, content, calls", [
    # harmony's lenient header parser would read stray words as a recipient: not a tool call
    ("<|channel|>analysis<|message|>ok<|end|><|start|>assistant garbled text <|message|> more<|return|>",
     "garbled text more", []),
    # plain text ended by a stop token while the parser still expects a header
    ("Just plain text.<|return|>", "Just plain text.", []),
    # a recipient written without the namespace is still a call when it follows "to="
    ("<|channel|>commentary to=get_weather <|constrain|>json<|message|>{}<|call|>", "", ["get_weather"]),
])
def test_invalid_headers_are_content_not_tool_calls(text, content, calls):
    p, deltas = stream(text)
    assert p.content == content and [c.name for c in p.tool_calls] == calls
    assert joined(deltas, "content") == content


def test_recipientless_commentary_is_content():
    p, _ = stream("<|channel|>commentary<|message|>Let me check.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    assert p.content == "Let me check.Done." and not p.tool_calls and not p.malformed


def test_a_header_that_never_ends_is_content_not_swallowed():
    """A model off the grammar: a special token, then plain text that never reaches
    <|message|>. The text must stream as content long before the output ends (a random
    model did this, and a 3,500-token stream came back empty)."""
    words = " ".join(f"word{i}" for i in range(300))
    p, deltas = stream("<|channel|>" + words)
    assert p.malformed and joined(deltas, "content").strip().endswith("word299")
    assert "word0" in joined(deltas, "content")
    parser, streamed = HarmonyStreamParser(), []
    for n, t in enumerate(ids("<|channel|>" + words), 1):
        streamed += parser.feed([t])
        if streamed:
            break
    assert streamed and n <= 130  # content flows once the header passes MAX_HEADER_TOKENS_ANY
