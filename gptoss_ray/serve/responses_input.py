"""Responses API items -> the chat-shaped messages harmony/render.py renders.

The Responses API spells a conversation as typed items; the chat API as role messages.
Both become one harmony conversation, so rather than a second renderer this module maps
items onto the chat shape render_chat already takes:
- `message` items keep their role; text parts are joined.
- `reasoning`, then `function_call` / assistant `message` items that follow it, fold into
  ONE assistant message (reasoning_content + tool_calls or content), which is how harmony
  orders an assistant turn: analysis, then commentary calls or the final answer. Which
  earlier reasoning survives is harmony's rule, applied by the renderer.
- `function_call_output` becomes a `tool` message; its call_id must name a function_call
  earlier in the conversation (400 otherwise: the model cannot be told who answered).
- Tool definitions (`{"type": "function", "name", ...}`) become chat tool definitions;
  hosted tools (web_search, mcp, file_search, ...) are a 400 naming the type.

Every error is an OpenAIError(400) whose `param` points into the request (`input[3].call_id`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_ray.serve.errors import OpenAIError

TEXT_PARTS = ("input_text", "output_text", "text")


def _bad(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_value")


def text_of(content: Any, param: str) -> str:
    """A message's content (string or list of text parts) as one string."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise _bad("content must be a string or a list of content parts", param)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in TEXT_PARTS and isinstance(part.get("text", ""), str):
            out.append(part.get("text", ""))
        elif kind == "refusal" and isinstance(part.get("refusal", ""), str):
            out.append(part.get("refusal", ""))
        else:
            raise _bad(f"content part type {kind!r} is not supported by this model (text only)", f"{param}[{j}]")
    return "".join(out)


def function_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Responses tool definitions -> chat tool definitions (function tools only)."""
    out = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind != "function":
            raise _bad(f"tool type {kind!r} is not supported by this server (only 'function' tools are; "
                       "hosted tools such as web_search, file_search or mcp are not available)", f"tools[{i}].type")
        name = tool.get("name")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise _bad("a function tool needs a name (1 to 256 characters)", f"tools[{i}].name")
        params = tool.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise _bad("parameters must be a JSON schema object", f"tools[{i}].parameters")
        description = tool.get("description")
        out.append({"type": "function", "function": {
            "name": name, "description": description if isinstance(description, str) else None,
            "parameters": params, "strict": tool.get("strict")}})
    return out


class _Turn:
    """An assistant turn being assembled from consecutive items."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.content: str | None = None
        self.tool_calls: list[dict[str, Any]] = []

    def empty(self) -> bool:
        return not (self.reasoning or self.content is not None or self.tool_calls)

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = "\n".join(self.reasoning)
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def to_messages(items: Sequence[Any], first: int = 0) -> list[dict[str, Any]]:
    """Chat messages for these items, in order (see the module docstring). Items before
    `first` come from the previous_response_id chain; errors name the others as `input[i]`."""
    messages: list[dict[str, Any]] = []
    turn = _Turn()
    call_ids: set[str] = set()

    def flush() -> None:
        nonlocal turn
        if not turn.empty():
            messages.append(turn.message())
        turn = _Turn()

    for i, item in enumerate(items):
        where = f"input[{i - first}]" if i >= first else "previous_response_id"
        if not isinstance(item, Mapping):
            raise _bad("each input item must be an object", where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            text = text_of(item.get("content"), f"{where}.content")
            if role == "assistant":
                if turn.tool_calls or turn.content is not None:
                    flush()
                turn.content = text
            elif role in ("user", "system", "developer"):
                flush()
                messages.append({"role": role, "content": text})
            else:
                raise _bad(f"unsupported message role {role!r} (user, system, developer or assistant)",
                           f"{where}.role")
        elif kind == "reasoning":
            if turn.tool_calls or turn.content is not None:
                flush()
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list):
                raise _bad("reasoning content must be a list of reasoning_text parts", f"{where}.content")
            text = "".join(p.get("text", "") for p in parts if isinstance(p, Mapping) and isinstance(p.get("text"), str))
            if text:
                turn.reasoning.append(text)
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments", "")
            if not isinstance(call_id, str) or not call_id:
                raise _bad("function_call needs a call_id", f"{where}.call_id")
            if not isinstance(name, str) or not name:
                raise _bad("function_call needs a name", f"{where}.name")
            if not isinstance(args, str):
                args = json.dumps(args)
            call_ids.add(call_id)
            turn.tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        elif kind == "function_call_output":
            flush()
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in call_ids:
                raise _bad(f"no function_call with call_id {call_id!r} precedes this function_call_output "
                           "(in this input or the previous_response_id chain)", f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else text_of(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "item_reference":
            raise _bad("item_reference items are not supported; send the item itself or use previous_response_id",
                       f"{where}.type")
        else:
            raise _bad(f"input item type {kind!r} is not supported by this server (message, function_call, "
                       "function_call_output and reasoning are)", f"{where}.type")
    flush()
    return messages
