"""OpenAI chat request -> harmony conversation -> prompt token ids.

The mapping (https://cookbook.openai.com/articles/openai-harmony):
- harmony's *system* message carries metadata only: identity, knowledge cutoff, date,
  `Reasoning: low|medium|high`, and the valid channels. OpenAI `system` and `developer`
  messages both become the harmony *developer* message's instructions, in order.
- `tools` (function JSON schemas) become the developer message's `functions` namespace;
  harmony then adds the "calls go to the commentary channel" line to the system message.
- An assistant turn becomes: its reasoning (client's `reasoning_content` or `reasoning`)
  on the analysis channel, then either its tool calls (commentary, `to=functions.NAME`,
  `<|constrain|>json`, ended by `<|call|>`) preceded by any text as a commentary
  preamble, or its text on the final channel.
- A `tool` message becomes a message from `functions.NAME` to the assistant on the
  commentary channel; NAME comes from the assistant tool call with that `tool_call_id`.
- Which earlier reasoning is kept is harmony's rule, applied by the renderer
  (`auto_drop_analysis`): analysis before the last final answer is dropped, analysis
  inside an unfinished tool loop is kept.

Input is plain JSON-like data (the serve layer's pydantic models dumped), so this module
knows nothing of HTTP.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

from gptoss_ray.errors import GptOssError
from gptoss_ray.harmony.encoding import get_encoding

REASONING_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}


class RenderError(GptOssError, ValueError):
    """The request cannot be rendered as a harmony conversation (HTTP 400). `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class RenderedPrompt:
    token_ids: list[int]  # the prompt, ending with `<|start|>assistant`
    conversation: Conversation  # what was rendered, for logging and tests
    has_tools: bool  # the developer message declares a functions namespace


def text_of(content: Any, param: str) -> str:
    """OpenAI message content (a string, None, or a list of text parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") in ("text", "input_text", "output_text"):
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RenderError(f"content part type {kind!r} is not supported (text only)", f"{param}[{i}]")
        return "".join(texts)
    raise RenderError("content must be a string or a list of text parts", param)


def _function_tools(tools: Iterable[Mapping[str, Any]]) -> list[ToolDescription]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), Mapping):
            raise RenderError("only tools of type 'function' are supported", f"tools[{i}]")
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RenderError("a function tool needs a name", f"tools[{i}].function.name")
        out.append(ToolDescription.new(fn["name"], fn.get("description") or "", fn.get("parameters")))
    return out


def _assistant_messages(msg: Mapping[str, Any], i: int, call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
    text = text_of(msg.get("content"), f"messages[{i}].content")
    tool_calls = msg.get("tool_calls") or []
    if not tool_calls:
        if text:
            out.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final"))
        return out
    if text:  # text beside tool calls is the model's commentary preamble
        out.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("commentary"))
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RenderError("a tool call needs function.name", f"messages[{i}].tool_calls[{j}]")
        args = fn.get("arguments")
        args = args if isinstance(args, str) else json.dumps(args if args is not None else {})
        if call.get("id"):
            call_names[call["id"]] = fn["name"]
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, args)
            .with_channel("commentary")
            .with_recipient(f"functions.{fn['name']}")
            .with_content_type("<|constrain|>json")
        )
    return out


def _tool_result(msg: Mapping[str, Any], i: int, call_names: dict[str, str], last_call: str | None) -> Message:
    name = call_names.get(msg.get("tool_call_id") or "") or msg.get("name") or last_call
    if not name:
        raise RenderError(
            "tool message does not answer any earlier assistant tool call (unknown tool_call_id)",
            f"messages[{i}].tool_call_id",
        )
    text = text_of(msg.get("content"), f"messages[{i}].content")
    author = Author.new(Role.TOOL, f"functions.{name}")
    return Message.from_author_and_content(author, text).with_channel("commentary").with_recipient("assistant")


def build_conversation(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    reasoning_effort: str | None = "medium",
    tool_choice: Any = "auto",
    start_date: str | None = None,
) -> tuple[Conversation, bool]:
    """The harmony conversation for an OpenAI chat request; also whether tools were declared."""
    if not messages:
        raise RenderError("messages must contain at least one message", "messages")
    effort = REASONING_EFFORTS.get(reasoning_effort or "medium")
    if effort is None:
        raise RenderError(f"reasoning_effort must be one of low, medium, high, got {reasoning_effort!r}", "reasoning_effort")
    date = start_date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    system = SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(date)

    instructions: list[str] = []
    body: list[Message] = []
    call_names: dict[str, str] = {}
    last_call: str | None = None
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, Mapping) else None
        if role in ("system", "developer"):
            instructions.append(text_of(msg.get("content"), f"messages[{i}].content"))
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, text_of(msg.get("content"), f"messages[{i}].content")))
        elif role == "assistant":
            new = _assistant_messages(msg, i, call_names)
            last_call = next((m.recipient.removeprefix("functions.") for m in reversed(new) if m.recipient), last_call)
            body.extend(new)
        elif role in ("tool", "function"):
            body.append(_tool_result(msg, i, call_names, last_call))
        else:
            raise RenderError(f"unsupported message role {role!r}", f"messages[{i}].role")

    developer = DeveloperContent.new()
    if any(instructions):
        developer = developer.with_instructions("\n\n".join(t for t in instructions if t))
    has_tools = bool(tools) and tool_choice != "none"
    if has_tools:
        developer = developer.with_function_tools(_function_tools(tools or []))
    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    if developer.instructions or developer.tools:
        head.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return Conversation.from_messages(head + body), has_tools


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    reasoning_effort: str | None = "medium",
    tool_choice: Any = "auto",
    start_date: str | None = None,
) -> RenderedPrompt:
    """Prompt token ids for an OpenAI chat request, ready for the assistant's next turn.

    `tool_choice` "none" renders without the tools (the model is not told about them)."""
    conversation, has_tools = build_conversation(messages, tools, reasoning_effort, tool_choice, start_date)
    token_ids = get_encoding().render_conversation_for_completion(
        conversation, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=True)
    )
    return RenderedPrompt(token_ids=list(token_ids), conversation=conversation, has_tools=has_tools)


def encode_text(text: str) -> list[int]:
    """Token ids of a raw /v1/completions prompt; harmony special tokens spelled in it count."""
    return get_encoding().encode(text, allowed_special="all")
