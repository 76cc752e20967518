"""Request -> harmony-level grammar: structured outputs and forced tool calls that keep the reasoning.

The grammar covers the assistant turn *after* the rendered prompt (which ends with
`<|start|>assistant`), so it composes with any conversation, tool results included:

    start:    analysis? answer
    analysis: <|channel|>analysis<|message|> REASONING <|end|><|start|>assistant
    answer (json_schema / json_object):
              <|channel|>final<|message|> JSON <|return|>
    answer (tool_choice required / named): one of, per allowed function NAME,
              <|channel|>commentary to=functions.NAME <|constrain|>json<|message|> ARGS <|call|>
              (or harmony's rendered order, ` to=functions.NAME<|channel|>commentary ...`)
    answer (tool_choice auto with strict tools, or with tools and response_format):
              a final answer (free text, or the JSON when response_format asks), or a call
              whose ARGS match the tool's schema when it is strict (free text otherwise)

REASONING is free text bounded by a token budget (`max_reasoning_tokens`, default half of
max_tokens): when the budget runs out the grammar allows nothing but `<|end|>`, so the
answer always starts within max_tokens. It may be empty, and with a budget of 0 the
analysis message is left out.

Steering for models that do not close what they open (a random-weight model never ends a
JSON string or number by itself): objects that list `properties` and say nothing about
`additionalProperties` get `additionalProperties: false` (as xgrammar's strict mode and
OpenAI's strict schemas do); integers and numbers without bounds get I-JSON's
+-(2^53 - 1) (RFC 7493), which bounds their integer digits; and, when `max_string_length`
is set (a server option, off by default), strings without a bound get that `maxLength`
and a free-form object (json_object) gets keys of at most that length and bounded
values. All of these only narrow the set of valid outputs; every output still validates
against the user's schema. Not steerable: the fraction digits of a float. No JSON whitespace is allowed between tokens
(compact JSON, as OpenAI returns it).

Entry points, one per API shape (each returns llguidance Lark text, or None when the
request needs no grammar): `chat_grammar` (chat completions), `completion_grammar`
(/v1/completions: the bare JSON, then `<|return|>`), and `responses_grammar` for
/v1/responses (`text.format`, flat `tools`, `tool_choice`). Raise GrammarError (400)
naming the parameter for what cannot be served. Check the result with
`guidance.check` (compile + timeout) before sending it to the engine in
SamplingParams.grammar.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_ray.harmony.guidance import GrammarError

MAX_SCHEMA_BYTES = 256 * 1024  # a schema beyond this is a denial-of-service, not a use case
MAX_ENUM = 4096  # values in one enum
REASONING_SHARE = 0.5  # default reasoning budget: this share of max_tokens


def reasoning_budget(max_tokens: int | None, max_reasoning_tokens: int | None) -> int:
    """Tokens the analysis channel may use: the request's choice, else half of max_tokens
    (leaving the other half for the answer)."""
    if max_reasoning_tokens is not None:
        if max_tokens is not None and max_reasoning_tokens >= max_tokens:
            raise GrammarError(f"max_reasoning_tokens ({max_reasoning_tokens}) must be below max_tokens "
                               f"({max_tokens}), leaving room for the answer", "max_reasoning_tokens")
        return max_reasoning_tokens
    return int((max_tokens or 2048) * REASONING_SHARE)


# --- schemas --------------------------------------------------------------------------------


I_JSON_MAX = 2**53 - 1  # RFC 7493 (I-JSON): integers beyond this lose precision in most JSON parsers


_OPEN_FORMATS = ("email", "idn-email", "hostname", "idn-hostname", "uri", "uri-reference", "iri")


def _any_value(max_string_length: int) -> dict[str, Any]:
    """A bounded stand-in for "any JSON value" (json_object under steering)."""
    leaf = [{"type": "string", "maxLength": max_string_length}, {"type": "integer"}, {"type": "boolean"},
            {"type": "null"}]
    return {"anyOf": leaf + [{"type": "array", "items": {"anyOf": leaf}, "maxItems": 8}]}


def _walk(node: Any, max_string_length: int | None) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, max_string_length)
        return
    if not isinstance(node, dict):
        return
    enum = node.get("enum")
    if isinstance(enum, list) and len(enum) > MAX_ENUM:
        raise GrammarError(f"an enum has {len(enum)} values; at most {MAX_ENUM} are supported")
    types = node.get("type")
    types = types if isinstance(types, list) else [types]
    if "properties" in node and "additionalProperties" not in node and "object" in types + [None]:
        node["additionalProperties"] = False
    if {"integer", "number"} & set(types) and not {"enum", "const"} & node.keys():
        # digits are unbounded otherwise; no JSON parser keeps integers past I-JSON's range exactly
        if "minimum" not in node and "exclusiveMinimum" not in node:
            node["minimum"] = -I_JSON_MAX
        if "maximum" not in node and "exclusiveMaximum" not in node:
            node["maximum"] = I_JSON_MAX
    if max_string_length is not None:
        fixed = "pattern" in node or node.get("format", "email") not in _OPEN_FORMATS  # their own length
        if "string" in types and "maxLength" not in node and not fixed and not {"enum", "const"} & node.keys():
            node["maxLength"] = max(int(node.get("minLength", 0)), max_string_length)
        if types == ["object"] and not {"properties", "additionalProperties", "patternProperties"} & node.keys():
            # free-form object (json_object): short keys, bounded values
            node["patternProperties"] = {f"^[A-Za-z0-9_]{{1,{max_string_length}}}$": _any_value(max_string_length)}
            node["additionalProperties"] = False
    for key, value in node.items():
        if key not in ("enum", "const", "default", "examples"):
            _walk(value, max_string_length)


def prepare_schema(schema: Any, param: str, max_string_length: int | None = None) -> dict[str, Any]:
    """The user's JSON schema with the steering above and llguidance's compact-JSON option."""
    if schema is True or schema is None:
        schema = {}
    if not isinstance(schema, Mapping):
        raise GrammarError("the JSON schema must be an object", param)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB", param)
    out = copy.deepcopy(dict(schema))
    try:
        _walk(out, max_string_length)
    except GrammarError as e:
        raise GrammarError(str(e), param) from None
    out["x-guidance"] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    return out


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(schema, separators=(",", ":"))


def _lit(text: str) -> str:
    return json.dumps(text)  # a Lark string literal (JSON escapes are valid Lark escapes)


def _head(budget: int) -> list[str]:
    if budget <= 0:
        return ["start: answer"]
    return [
        "start: analysis? answer",
        'analysis: <|channel|> "analysis" <|message|> reasoning <|end|> <|start|> "assistant"',
        f"reasoning[max_tokens={budget}]: /(.|\\n)*/",
    ]


def _final_json(schema: dict[str, Any]) -> list[str]:
    return ['final: <|channel|> "final" <|message|> final_json <|return|>', f"final_json: {_json(schema)}"]


def _calls(tools: Sequence[tuple[str, dict[str, Any] | None]]) -> tuple[list[str], list[str]]:
    """Rules for calls of these functions ((name, prepared schema or None = free text))."""
    names, rules = [], []
    for i, (name, schema) in enumerate(tools):
        to = f" to=functions.{name}"
        names.append(f"call_{i}")
        rules += [
            f'call_{i}: <|channel|> {_lit("commentary" + to + " ")} <|constrain|> "json" <|message|> args_{i} <|call|>'
            f'\n    | {_lit(to)} <|channel|> "commentary " <|constrain|> "json" <|message|> args_{i} <|call|>',
            f"args_{i}: {_json(schema)}" if schema is not None else f"args_{i}: /(.|\\n)*/",
        ]
    return names, rules


def json_answer_grammar(schema: dict[str, Any], budget: int) -> str:
    return "\n".join(_head(budget) + ["answer: final"] + _final_json(schema)) + "\n"


def tool_call_grammar(tools: Sequence[tuple[str, dict[str, Any]]], budget: int) -> str:
    names, rules = _calls(tools)
    return "\n".join(_head(budget) + ["answer: " + " | ".join(names)] + rules) + "\n"


def strict_auto_grammar(tools: Sequence[tuple[str, dict[str, Any] | None]], budget: int,
                        final_schema: dict[str, Any] | None = None) -> str:
    """tool_choice auto: a final answer (free text, or JSON when response_format asks) or a call."""
    names, rules = _calls(tools)
    final = _final_json(final_schema) if final_schema is not None else [
        'final: <|channel|> "final" <|message|> final_text <|return|>', "final_text: /(.|\\n)*/"]
    return "\n".join(_head(budget) + ["answer: final | " + " | ".join(names)] + final + rules) + "\n"


def completion_grammar(response_format: Mapping[str, Any] | None, max_string_length: int | None = None) -> str | None:
    """/v1/completions: the whole completion is the JSON, then `<|return|>` (llguidance's EOS)."""
    schema = _format_schema(response_format, "response_format", max_string_length)
    return None if schema is None else f"start: {_json(schema)}\n"


# --- OpenAI request shapes -------------------------------------------------------------------


def _format_schema(fmt: Mapping[str, Any] | None, param: str, max_string_length: int | None,
                   flat: bool = False) -> dict[str, Any] | None:
    """response_format (chat: {type, json_schema: {name, schema, strict}}) or Responses'
    text.format ({type, name, schema, strict}) -> the prepared schema, or None for text."""
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return prepare_schema({"type": "object"}, param, max_string_length)
    if kind != "json_schema":
        raise GrammarError(f"{param}.type {kind!r} is not supported (text, json_object, json_schema)", f"{param}.type")
    body = fmt if flat else fmt.get("json_schema")
    if not isinstance(body, Mapping):
        raise GrammarError(f"{param}.json_schema is required for type json_schema", f"{param}.json_schema")
    where = f"{param}.schema" if flat else f"{param}.json_schema.schema"
    return prepare_schema(body.get("schema", {}), where, max_string_length)


def _functions(tools: Sequence[Mapping[str, Any]] | None, flat: bool) -> list[dict[str, Any]]:
    out = []
    for tool in tools or []:
        fn = tool if flat else tool.get("function")
        if tool.get("type", "function") == "function" and isinstance(fn, Mapping) and fn.get("name"):
            out.append(dict(fn))
    return out


def _choice_name(tool_choice: Any, flat: bool) -> str | None:
    if isinstance(tool_choice, Mapping):
        fn = tool_choice if flat else tool_choice.get("function")
        return fn.get("name") if isinstance(fn, Mapping) else None
    return None


def _tool_grammar(functions: list[dict[str, Any]], tool_choice: Any, budget: int, max_string_length: int | None,
                  flat: bool, final_schema: dict[str, Any] | None) -> str | None:
    def schema(i: int, fn: Mapping[str, Any]) -> dict[str, Any]:
        params = fn.get("parameters")
        return prepare_schema(params if params is not None else {"type": "object"},
                              f"tools[{i}].function.parameters" if not flat else f"tools[{i}].parameters",
                              max_string_length)

    if tool_choice == "required" or isinstance(tool_choice, Mapping):
        if not functions:
            raise GrammarError("tool_choice requires tools to call, but no function tools were given", "tool_choice")
        name = _choice_name(tool_choice, flat)
        if isinstance(tool_choice, Mapping):
            if not name:
                raise GrammarError("a named tool_choice needs the function's name", "tool_choice")
            chosen = [(i, fn) for i, fn in enumerate(functions) if fn["name"] == name]
            if not chosen:
                raise GrammarError(f"tool_choice names function {name!r}, which is not among the tools", "tool_choice")
        else:
            chosen = list(enumerate(functions))
        return tool_call_grammar([(fn["name"], schema(i, fn)) for i, fn in chosen], budget)
    if not functions:
        return None if final_schema is None else json_answer_grammar(final_schema, budget)
    if final_schema is not None or any(fn.get("strict") for fn in functions):
        return strict_auto_grammar(
            [(fn["name"], schema(i, fn) if fn.get("strict") else None) for i, fn in enumerate(functions)], budget,
            final_schema)
    return None


def _check_names(functions: list[dict[str, Any]], param: str) -> None:
    for i, fn in enumerate(functions):
        name = fn["name"]
        if not isinstance(name, str) or any(c.isspace() or c in "<>|" for c in name):
            raise GrammarError(f"function name {name!r} may not contain spaces or <, >, |", f"{param}[{i}]")


def chat_grammar(response_format: Mapping[str, Any] | None, tools: Sequence[Mapping[str, Any]] | None,
                 tool_choice: Any, max_tokens: int | None, max_reasoning_tokens: int | None = None,
                 max_string_length: int | None = None) -> str | None:
    """The grammar of a chat completion request (plain dicts, as the pydantic models dump),
    or None when it needs none. A forced tool call wins over response_format; under
    tool_choice auto the model may call (arguments checked when the tool is strict) or
    answer, and response_format shapes that final answer (as OpenAI does)."""
    functions = _functions(tools, flat=False) if tool_choice != "none" else []
    _check_names(functions, "tools")
    budget = reasoning_budget(max_tokens, max_reasoning_tokens)
    schema = _format_schema(response_format, "response_format", max_string_length)
    return _tool_grammar(functions, tool_choice, budget, max_string_length, False, schema)


def responses_grammar(text_format: Mapping[str, Any] | None, tools: Sequence[Mapping[str, Any]] | None,
                      tool_choice: Any, max_output_tokens: int | None, max_reasoning_tokens: int | None = None,
                      max_string_length: int | None = None) -> str | None:
    """The same for /v1/responses: `text.format` ({type, name, schema, strict}), flat
    function tools ({type: function, name, parameters, strict}) and `tool_choice`
    ("auto" | "required" | "none" | {type: function, name})."""
    functions = _functions(tools, flat=True) if tool_choice != "none" else []
    _check_names(functions, "tools")
    budget = reasoning_budget(max_output_tokens, max_reasoning_tokens)
    schema = _format_schema(text_format, "text.format", max_string_length, flat=True)
    return _tool_grammar(functions, tool_choice, budget, max_string_length, True, schema)
