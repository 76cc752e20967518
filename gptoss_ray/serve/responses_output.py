"""Output processor pieces -> the Responses API's output items and streaming events.

One `OutputBuilder` per response takes what the output processor (gptoss_ray/output/,
the same harmony parse, finish reasons and content logprobs as chat) made of the
generated tokens and turns its pieces into typed items: `reasoning`
(analysis channel, as `reasoning_text` content), `message` (final channel and preambles,
as `output_text`, with logprobs of exactly its tokens when asked) and `function_call`
(one per recipient message, `call_id` from the parser). Each item is opened, filled and
closed with OpenAI's events (output_item.added, content_part.added, *.delta, *.done,
content_part.done, output_item.done); the non-streamed reply is the same items with the
events dropped, so the two cannot disagree. Sequence numbers are added by the sender.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from gptoss_ray.harmony.parse import Delta
from gptoss_ray.output import OutputProcessor, SampleOutput
from gptoss_ray.serve.sampling import chat_logprobs


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class OutputBuilder:
    """Processor outputs -> output items, and the streaming events that build them."""

    top: int | None  # top_logprobs when logprobs are included, else None
    processor: OutputProcessor  # the response's one sample (n is 1): feed it the engine's deltas
    output: list[dict[str, Any]] = field(default_factory=list)
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _open: dict[str, Any] | None = None  # the item being streamed
    _logprobs: list[dict[str, Any]] = field(default_factory=list)  # entries not yet sent with a delta
    _item_logprobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sample(self):
        return self.processor.samples[0]

    def absorb(self, out: SampleOutput) -> list[dict[str, Any]]:
        self.num_tokens += len(out.token_ids)
        self.token_ids += out.token_ids
        if self.top is not None and out.logprobs:  # content tokens only, released with their text
            tokens, entries = zip(*out.logprobs)
            self._logprobs += chat_logprobs(tokens, entries, self.top)
        if out.finished:
            self.finish_reason = out.finish_reason
        events = []
        for piece in out.pieces:
            events += self._piece(piece)
        if out.finished:
            events += self._close(self.status() == "completed")
        return events

    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def _piece(self, piece: Delta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        kind = {"reasoning": "reasoning", "content": "message", "tool_call": "function_call"}[piece.kind]
        if self._open is None or self._open["type"] != kind or piece.tool_id is not None:
            events += self._close(True)
            events += self._start(kind, piece)
        item, ref = self._open, self._ref()
        if kind == "reasoning":
            item["content"][0]["text"] += piece.text
            events.append({"type": "response.reasoning_text.delta", **ref, "content_index": 0, "delta": piece.text})
        elif kind == "message":
            item["content"][0]["text"] += piece.text
            sent, self._logprobs = self._logprobs, []
            self._item_logprobs += sent
            events.append({"type": "response.output_text.delta", **ref, "content_index": 0, "delta": piece.text,
                           "logprobs": sent})
        elif piece.text:
            item["arguments"] += piece.text
            events.append({"type": "response.function_call_arguments.delta", **ref, "delta": piece.text})
        return events

    def _ref(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.output) - 1}

    def _start(self, kind: str, piece: Delta) -> list[dict[str, Any]]:
        if kind == "reasoning":
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress",
                    "content": [{"type": "reasoning_text", "text": ""}]}
        elif kind == "message":
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            self._item_logprobs = []
        else:
            call = self.sample.tool_calls[piece.tool_index or 0]
            item = {"id": new_id("fc"), "type": "function_call", "call_id": call.id, "name": call.name,
                    "arguments": "", "status": "in_progress"}
        added = json.loads(json.dumps(item))  # the empty shell, as OpenAI sends it
        if kind != "function_call":
            added["content"] = []
        self.output.append(item)
        self._open = item
        events = [{"type": "response.output_item.added", "output_index": len(self.output) - 1, "item": added}]
        if kind != "function_call":
            part = dict(item["content"][0])
            events.append({"type": "response.content_part.added", **self._ref(), "content_index": 0, "part": part})
        return events

    def _close(self, complete: bool) -> list[dict[str, Any]]:
        item = self._open
        if item is None:
            return []
        self._open = None
        ref = {"item_id": item["id"], "output_index": len(self.output) - 1}
        item["status"] = "completed" if complete else "incomplete"
        events: list[dict[str, Any]] = []
        if item["type"] == "reasoning":
            part = item["content"][0]
            events.append({"type": "response.reasoning_text.done", **ref, "content_index": 0, "text": part["text"]})
            events.append({"type": "response.content_part.done", **ref, "content_index": 0, "part": part})
        elif item["type"] == "message":
            part = item["content"][0]
            self._item_logprobs += self._logprobs
            self._logprobs = []
            if self.top is not None:
                part["logprobs"] = self._item_logprobs
            events.append({"type": "response.output_text.done", **ref, "content_index": 0, "text": part["text"],
                           "logprobs": part["logprobs"]})
            events.append({"type": "response.content_part.done", **ref, "content_index": 0, "part": part})
        else:
            events.append({"type": "response.function_call_arguments.done", **ref, "arguments": item["arguments"],
                           "name": item["name"]})
        events.append({"type": "response.output_item.done", "output_index": ref["output_index"], "item": item})
        return events


def usage(builder: OutputBuilder, num_prompt: int, num_cached: int) -> dict[str, Any]:
    return {"input_tokens": num_prompt, "input_tokens_details": {"cached_tokens": num_cached, "cache_write_tokens": 0},
            "output_tokens": builder.num_tokens,
            "output_tokens_details": {"reasoning_tokens": builder.sample.num_reasoning_tokens},
            "total_tokens": num_prompt + builder.num_tokens}
