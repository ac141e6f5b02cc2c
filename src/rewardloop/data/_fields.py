"""Field checks shared by the format parsers: each raises :class:`Invalid` naming the field."""

from __future__ import annotations

import math
from typing import Any

from rewardloop.data.records import CHAT_ROLES, Chat, Text
from rewardloop.data.values import content_hash

# Column widths in the store (schema.py): longer values would fail on PostgreSQL.
MAX_ID_CHARS = 255
MAX_ANNOTATOR_CHARS = 120
MAX_GUIDELINE_CHARS = 64


class Invalid(Exception):
    """A field problem; the line loop adds the file and line to make a DataError."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


def kind_of(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def check_str(value: str, name: str) -> str:
    if "\x00" in value:
        raise Invalid(name, "contains a NUL character (\\u0000), which databases cannot store")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid(name, "contains an unpaired surrogate escape (\\ud800-\\udfff)") from None
    return value


def check_json(value: Any, name: str) -> Any:
    """Check a free-form JSON value (meta, extra message keys): only JSON's own types (a
    Parquet timestamp, bytes or decimal is not one), finite numbers, storable strings."""
    if isinstance(value, str):
        check_str(value, name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json(item, f"{name}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise Invalid(name, f"has the key {key!r}; JSON object keys are strings")
            check_str(key, name)
            check_json(item, f"{name}.{key}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise Invalid(name, f"is {value!r}; JSON has no NaN or Infinity")
    elif value is not None and not isinstance(value, bool | int | float):
        raise Invalid(name, f"is {kind_of(value)} ({value!r:.60}), which JSON cannot hold; "
                      "store it as a string or a number")
    return value


def string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise Invalid(name, f"must be a string, got {kind_of(value)}")
    return check_str(value, name)


def chat(value: Any, name: str, *, answer: bool = False) -> Chat:
    if not isinstance(value, list) or not value:
        raise Invalid(name, "must be a non-empty list of {role, content} messages")
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise Invalid(where, f"must be a {{role, content}} object, got {kind_of(message)}")
        if message.get("role") not in CHAT_ROLES:
            raise Invalid(f"{where}.role", f"must be one of {list(CHAT_ROLES)}, "
                           f"got {message.get('role')!r}")
        if "content" not in message:
            raise Invalid(f"{where}.content", "is missing")
        string(message["content"], f"{where}.content")
        check_json(message, where)
    if answer and value[-1]["role"] != "assistant":
        raise Invalid(f"{name}[{len(value) - 1}].role", "the last message of an answer must be "
                       f"the assistant's, got {value[-1]['role']!r}")
    return value


def text(value: Any, name: str, *, answer: bool = False) -> Text:
    if isinstance(value, list):
        return chat(value, name, answer=answer)
    if isinstance(value, str):
        return check_str(value, name)
    raise Invalid(name, f"must be a string or a list of chat messages, got {kind_of(value)}")


def number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Invalid(name, f"must be a finite number, got {kind_of(value)} {value!r}")
    return float(value)


def required(obj: dict[str, Any], key: str) -> Any:
    if obj.get(key) is None:
        raise Invalid(key, "is missing")
    return obj[key]


def ident(obj: dict[str, Any], key: str = "id", limit: int = MAX_ID_CHARS) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    value = string(value, key)
    if len(value) > limit:
        raise Invalid(key, f"is {len(value)} characters long; at most {limit} are stored")
    return value


def boolean(obj: dict[str, Any], key: str, default: bool | None = None) -> bool:
    """``obj[key]`` as a bool; with a ``default``, an absent key or a null gives it (pandas and
    ``Dataset.to_json`` write null for an empty optional column)."""
    value = required(obj, key) if default is None else obj.get(key)
    if value is None:
        value = default
    if not isinstance(value, bool):
        raise Invalid(key, f"must be true or false, got {kind_of(value)} {value!r}")
    return value


def whole(value: Any, name: str) -> int:
    """A non-negative whole number; ``3.0`` counts (pandas writes a nullable int column as
    floats)."""
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value != int(value) or value < 0):
        raise Invalid(name, f"must be a whole number >= 0, got {kind_of(value)} {value!r}")
    return int(value)


def choice(obj: dict[str, Any], key: str, choices: tuple[str, ...]) -> str | None:
    """``obj[key]``, one of ``choices``, or None when absent."""
    value = obj.get(key)
    if value is not None and value not in choices:
        raise Invalid(key, f"must be one of {list(choices)}, got {value!r}")
    return value


def distinct(items: list[Text], name: str) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first = seen.setdefault(content_hash(item), i)
        if first != i:
            raise Invalid(f"{name}[{i}]", f"repeats {name}[{first}]; rank each answer once")
