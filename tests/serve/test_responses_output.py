"""OutputBuilder alone: the items do not depend on how the tokens were chunked, and the
events rebuild exactly the items (what a streaming client accumulates is what is stored)."""

from __future__ import annotations

import pytest

from gptoss_ray.harmony.encoding import get_encoding
from gptoss_ray.output import OutputProcessor
from gptoss_ray.sampling_params import SamplingParams, TokenDelta
from gptoss_ray.serve.responses_output import OutputBuilder
from gptoss_ray.serve.testing import SCRIPTS


def builder_and_feed():
    """A builder, and a function feeding it engine deltas through the output processor."""
    builder = OutputBuilder(top=None, processor=OutputProcessor(SamplingParams(max_tokens=None), harmony=True))

    def feed(tokens: list[int], finish_reason: str | None) -> list[dict]:
        out = builder.processor.process(TokenDelta("r", 0, tokens, finish_reason=finish_reason))
        return builder.absorb(out) if out is not None else []

    return builder, feed


def run(name: str, step: int) -> tuple[OutputBuilder, list[dict]]:
    tokens = get_encoding().encode(SCRIPTS[name], allowed_special="all")
    (builder, feed), events = builder_and_feed(), []
    for i in range(0, len(tokens), step):
        last = i + step >= len(tokens)
        events += feed(tokens[i:i + step], "stop" if last else None)
    return builder, events


def strip_ids(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


@pytest.mark.parametrize("name", ["reasoning_final", "tool_call", "malformed", "plain"])
def test_items_do_not_depend_on_chunking(name):
    one, _ = run(name, 1)
    many, _ = run(name, 1000)
    assert strip_ids(one.output) == strip_ids(many.output) and one.output


@pytest.mark.parametrize("name", ["reasoning_final", "tool_call"])
def test_events_rebuild_the_items(name):
    builder, events = run(name, 2)
    rebuilt: dict[int, dict] = {}
    for e in events:
        if e["type"] == "response.output_item.added":
            rebuilt[e["output_index"]] = {"text": "", "args": ""}
        elif e["type"] in ("response.output_text.delta", "response.reasoning_text.delta"):
            rebuilt[e["output_index"]]["text"] += e["delta"]
        elif e["type"] == "response.function_call_arguments.delta":
            rebuilt[e["output_index"]]["args"] += e["delta"]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == list(range(len(builder.output)))
    for i, item in enumerate(builder.output):
        if item["type"] == "function_call":
            assert rebuilt[i]["args"] == item["arguments"] and item["status"] == "completed"
        else:
            assert rebuilt[i]["text"] == item["content"][0]["text"]


def test_length_stop_marks_the_open_item_incomplete():
    tokens = get_encoding().encode(SCRIPTS["stop_mid_channel"], allowed_special="all")
    builder, feed = builder_and_feed()
    feed(tokens[:12], "length")
    assert builder.status() == "incomplete" and builder.output[-1]["status"] == "incomplete"
