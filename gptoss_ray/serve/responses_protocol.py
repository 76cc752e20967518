"""The Responses API request (POST /v1/responses), validated at the edge.

Top-level fields are pydantic (a wrong type is a 400 naming the field). `input` items
and `tools` stay plain JSON here and are checked item by item in responses_input.py,
because OpenAI's item union is wide and a client deserves "input[3]: function_call_output
needs call_id" rather than a page of union-member failures. Unknown fields are ignored,
as everywhere in this API: the agents SDK sends extras.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gptoss_ray.serve.protocol import MAX_NAME, MAX_TOKENS, _check_json

MAX_INPUT_ITEMS = 4096  # items in one request (a long agent transcript fits; a flood does not)
MAX_TOOLS = 128
MAX_METADATA_KEYS = 16  # OpenAI's limit: 16 pairs, keys <= 64 chars, values <= 512 chars
# `include` values this server honours; others (file_search results, encrypted reasoning)
# concern tools or features it does not have, and are accepted and ignored like OpenAI's
# unknown-but-valid values would be on a model without them.
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class _Request(BaseModel):
    # the chat API's rules (serve/protocol.py): JSON types as sent, finite floats only
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class ReasoningParam(_Request):
    effort: Literal["minimal", "low", "medium", "high"] | None = None
    summary: str | None = None  # accepted; gpt-oss returns its raw reasoning, never a summary


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextParam(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Request):
    model: str = Field(min_length=1, max_length=MAX_NAME, description="The served model name (GET /v1/models).")
    input: str | list[dict[str, Any]] = Field(
        description="A user message as a string, or a list of items (messages, function_call, "
        "function_call_output, reasoning).", max_length=MAX_INPUT_ITEMS)
    instructions: str | None = Field(None, description="System/developer instructions for this turn only.")
    previous_response_id: str | None = Field(None, max_length=128)
    reasoning: ReasoningParam | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = Field(None, max_length=16)
    metadata: dict[str, str] | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    text: TextParam | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = Field(None, max_length=MAX_NAME)

    @model_validator(mode="before")
    @classmethod
    def _sane_json(cls, data: Any) -> Any:
        _check_json(data)  # nesting depth and lone surrogates, as for chat
        return data

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None:
            if len(metadata) > MAX_METADATA_KEYS:
                raise ValueError(f"at most {MAX_METADATA_KEYS} metadata pairs")
            if any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return metadata

    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or []) or bool(self.top_logprobs)


class InputItemList(BaseModel):
    """GET /v1/responses/{id}/input_items (documents the schema)."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class ResponseObject(BaseModel):
    """The `response` object (documents the schema; built as a dict in responses.py)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
