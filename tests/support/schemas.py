"""JSON schemas for the constrained-decoding tests: nested objects, arrays with min/max items,
enums, patterns and formats, bounded numbers, anyOf, optional and required fields, and the
schemas the openai SDK sends for pydantic models (strict: every field required, no extras)."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, Field


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str
    city: str
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    address: Address
    favorite: Color


class Step(BaseModel):
    explanation: str
    output: str


class MathReasoning(BaseModel):  # the openai SDK's structured-outputs example
    steps: list[Step]
    final_answer: str


class Event(BaseModel):
    title: str
    kind: Literal["meeting", "call", "lunch"]
    attendees: list[str] = Field(max_length=3)
    priority: int | None


PYDANTIC_MODELS = [Person, MathReasoning, Event, Address, Step]


def _obj(props: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **extra}


SCHEMAS: list[dict] = [
    {"type": "object"},
    {"type": "integer"},
    {"type": "boolean"},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "number", "minimum": -5, "maximum": 5},
    _obj({"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}}),
    _obj({"a": {"type": "integer"}, "b": {"type": "string"}}, required=["a"]),
    _obj({"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "null"}}, required=[]),
    _obj({"ok": {"type": "boolean"}}, additionalProperties=False),
    _obj({"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}}),
    _obj({"xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2,
                 "maxItems": 4}}),
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 5},
    {"type": "array", "items": _obj({"id": {"type": "integer"}}), "minItems": 1, "maxItems": 2},
    _obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}}),
    _obj({"kind": {"const": "point"}, "x": {"type": "number"}, "y": {"type": "number"}}),
    _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    _obj({"when": {"type": "string", "format": "date"}}),
    _obj({"at": {"type": "string", "format": "date-time"}}),
    _obj({"mail": {"type": "string", "format": "email"}}),
    _obj({"id": {"type": "string", "format": "uuid"}}),
    _obj({"short": {"type": "string", "minLength": 2, "maxLength": 5}}),
    _obj({"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}),
    _obj({"n": {"type": "integer", "minimum": 100, "maximum": 200}}),
    _obj({"v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]}}),
    _obj({"v": {"anyOf": [_obj({"a": {"type": "integer"}}), _obj({"b": {"type": "boolean"}})]}}),
    _obj({"v": {"type": ["integer", "null"]}}),
    _obj({"outer": _obj({"inner": _obj({"leaf": {"type": "integer"}})})}),
    _obj({"matrix": {"type": "array", "maxItems": 2,
                     "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}}),
    _obj({"user": _obj({"name": {"type": "string"}, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]},
                                                              "maxItems": 2}}),
          "active": {"type": "boolean"}}),
    {"$defs": {"pt": _obj({"x": {"type": "integer"}, "y": {"type": "integer"}})},
     **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
    _obj({"score": {"type": "number"}, "label": {"type": "string"}}, required=["score"]),
] + [m.model_json_schema() for m in PYDANTIC_MODELS]
