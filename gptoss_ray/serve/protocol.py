"""OpenAI request and response models (the subset gpt-oss serving supports).

Requests are validated here, so a wrong type or an out-of-range value is a 400 that
names the parameter before anything reaches the engine. Every number a client sends has
both bounds here (one place: a 10^20 `top_k` once overflowed the sampler and killed the
engine for everyone); types are strict, as OpenAI's are (`"max_tokens": "5"` and a prompt
of `[true, false]` are 400s, not coerced); OpenAI parameters this server does not
implement are 400s naming them, never silently ignored. Unknown fields are ignored, as
OpenAI-compatible servers do, because clients (LangChain, agents) send extras.
Responses are built as plain dicts in chat.py / completions.py; their models below
document the schema in /openapi.json.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gptoss_ray.config import HARMONY_VOCAB_SIZE
from gptoss_ray.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS
from gptoss_ray.serve.errors import OpenAIError

MAX_N = 16  # samples per request: n beyond this is a denial-of-service, not a use case
MAX_TOKENS = 1 << 24  # far beyond any context length: larger is a typo or an attack, not a request
MAX_TOP_K = 1 << 20  # above the vocabulary (201,088): such a top_k keeps every token
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
VOCAB_LIMIT = HARMONY_VOCAB_SIZE  # o200k_harmony's vocabulary: token ids a client may name
MAX_JSON_DEPTH = 64  # nesting of a request body (tool schemas included); deeper is an attack
MAX_NAME = 256  # model names, tool names, ids, `user`


class _Request(BaseModel):
    # strict: JSON types as sent (no "5" -> 5, no true -> 1); finite floats only
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _check_json(data: Any) -> None:
    """Reject what the models cannot see: nesting deeper than MAX_JSON_DEPTH anywhere (a
    ~900-deep tool schema once overflowed the renderer's recursion) and strings that are
    not Unicode text (a lone surrogate such as "\\ud800" parses as JSON but cannot be
    encoded to the tokenizer's UTF-8). Iterative, so the check itself cannot overflow."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        obj, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise OpenAIError(400, f"the request nests deeper than {MAX_JSON_DEPTH} levels", param=path[:120] or None)
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                raise OpenAIError(400, "strings must be valid Unicode (no lone surrogates such as \\ud800)",
                                  param=path[:120] or None) from None
        elif isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((k, depth + 1, path))
                stack.append((v, depth + 1, f"{path}.{k}" if path else str(k)))
        elif isinstance(obj, list):
            stack.extend((v, depth + 1, f"{path}[{i}]") for i, v in enumerate(obj))


def _unsupported(value: Any, info: ValidationInfo, hint: str) -> Any:
    if value is not None:
        raise ValueError(f"'{info.field_name}' is not supported by this server{hint}")
    return value


class TextPart(_Request):
    type: Literal["text", "input_text", "output_text", "image_url", "input_image", "input_audio", "file"]
    text: str | None = None


class FunctionCall(_Request):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    arguments: str = Field("", description="JSON text of the arguments, as the model wrote it.")


class ToolCallParam(_Request):
    id: str | None = Field(None, max_length=MAX_NAME)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=MAX_NAME)
    tool_calls: list[ToolCallParam] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=MAX_NAME)
    reasoning_content: str | None = Field(None, description="Earlier reasoning sent back by the client.")
    reasoning: str | None = Field(None, description="Same as reasoning_content (the other name in use).")


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str = Field(max_length=MAX_NAME)


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by chat and text completions (OpenAI names, ranges and defaults)."""

    model: str = Field(min_length=1, max_length=MAX_NAME, description="The served model name (GET /v1/models).")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters; in chat "
        "they end the reply's content (never its reasoning).")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS,
        description="Token id (as a string) -> bias in [-100, 100] added to its logit before sampling.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_NAME)
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of = n (no reranking).")
    # vLLM extensions, used by benchmarks
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _sane_json(cls, data: Any) -> Any:
        _check_json(data)
        return data

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not (token.isascii() and token.isdigit() and int(token) < VOCAB_LIMIT):
                raise ValueError(f"keys must be token ids in [0, {VOCAB_LIMIT}), got {token[:20]!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"values must be in [-100, 100], got {value} for token {token}")
        return bias

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("only 'best_of' equal to n is supported (this server does not rerank samples)")
        return value


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolParam] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_reasoning_tokens: int | None = Field(
        None, ge=0, le=MAX_TOKENS, description="Extension: analysis-channel budget of a constrained reply (structured "
        "output or forced tool call); the grammar closes the reasoning when it runs out. Default: half of max_tokens.")
    # OpenAI parameters this server does not implement: a 400 naming them, never ignored
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported: use tools.")
    function_call: str | dict[str, Any] | None = Field(None, description="Not supported: use tool_choice.")
    audio: dict[str, Any] | None = Field(None, description="Not supported (text only).")
    web_search_options: dict[str, Any] | None = Field(None, description="Not supported.")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("'top_logprobs' needs 'logprobs' set to true")
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _legacy_functions(cls, value: Any, info: ValidationInfo) -> Any:
        return _unsupported(value, info, " (the legacy functions API): use tools and tool_choice")

    @field_validator("audio", "web_search_options")
    @classmethod
    def _not_implemented(cls, value: Any, info: ValidationInfo) -> Any:
        return _unsupported(value, info, "")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a batch of texts, token ids, or a batch of token id lists."
    )
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS, description="0 only with echo: score the prompt, "
                                   "generate nothing (lm-eval-harness's loglikelihood requests).")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="Return the prompt before the completion; with logprobs, the prompt's "
                       "logprobs too (the first token's is null).")
    suffix: str | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = Field(
        None, description="Extension: the completion is JSON (matching json_schema.schema), then <|return|>.")


class TokenizeCompletionRequest(_Request):
    """vLLM's /tokenize of raw text."""

    model: str | None = None
    prompt: str = Field(max_length=4 * 1024 * 1024)
    add_special_tokens: bool = Field(True, description="Accepted for vLLM compatibility; harmony adds none.")
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    """vLLM's /tokenize of a chat: the harmony prompt /v1/chat/completions would send."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="End with `<|start|>assistant`, ready for the reply.")
    tools: list[ToolParam] | None = Field(None, max_length=128)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


# --- responses (documentation of what chat.py / completions.py return) --------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptoss-ray"
    root: str | None = Field(None, description="The primary served name (several names can serve one model).")
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
