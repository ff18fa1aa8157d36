"""The one strict loader: a JSON object to a dataclass, refusing unknown, missing and wrongly typed fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, fields
from functools import cache
from typing import NamedTuple, TypeVar

from mmserve.errors import MmserveError

T = TypeVar("T")

# JSON types each field annotation admits (annotations are strings under `from __future__ import annotations`)
_JSON_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                            "dict": (dict,), "list[str]": (list,), "list[int]": (list,)}
_ITEM_TYPES: dict[str, type] = {"list[str]": str, "list[int]": int}


def check_json_type(value: object, annotation: str, where: str, error: type[Exception] = MmserveError,
                    field_name: str | None = None) -> None:
    """Refuse a value whose JSON type does not fit a field's annotation (bool is not a number, nor a number bool);
    the message names `where` (and `.field_name`, when given)."""
    base = annotation.removesuffix(" | None")
    if value is None and base != annotation:
        return
    types = _JSON_TYPES.get(base)
    if types is None:  # nested dataclasses and other annotations: built and checked by the caller
        return
    item = _ITEM_TYPES.get(base)
    wrong_bool = isinstance(value, bool) and bool not in types
    # the items' exact types (JSON gives exactly str and int; bool is not an int here)
    if not isinstance(value, types) or wrong_bool or (item is not None and not {type(x) for x in value} <= {item}):
        at = where if field_name is None else f"{where}.{field_name}"
        raise error(f"{at}: expected {base}, got {json.dumps(value)[:80]}")


class _Schema(NamedTuple):
    names: frozenset[str]
    required: frozenset[str]
    # (field, annotation, JSON types admitted) for every field whose JSON type is checked here
    checked: tuple[tuple[str, str, tuple[type, ...]], ...]


@cache
def _schema(cls: type) -> _Schema:
    """A dataclass's fields, read once (a manifest of thousands of tasks builds thousands of entries)."""
    fs = fields(cls)
    checked = tuple((f.name, str(f.type), _JSON_TYPES[str(f.type).removesuffix(" | None")]) for f in fs
                    if str(f.type).removesuffix(" | None") in _JSON_TYPES)
    return _Schema(frozenset(f.name for f in fs),
                   frozenset(f.name for f in fs if f.default is MISSING and f.default_factory is MISSING), checked)


def from_dict(cls: type[T], data: object, where: str, error: type[Exception] = MmserveError, *,
              check_types: bool = True) -> T:
    """Construct dataclass `cls` from a dict, naming `where` and the field on any mismatch of name or type."""
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected an object, got {type(data).__name__}")
    schema = _schema(cls)
    if not schema.names.issuperset(data):
        raise error(f"{where}: unknown field(s) {sorted(set(data) - schema.names)}")
    if not schema.required.issubset(data):
        raise error(f"{where}: missing field(s) {sorted(schema.required - set(data))}")
    if check_types:
        for name, annotation, types in schema.checked:
            value = data.get(name)
            # the common case decided here (a value of an admitted type, not a bool where a number is wanted,
            # not a list, whose items need a look); everything else by check_json_type
            if value is None or type(value) is bool or type(value) not in types or type(value) is list:
                if name in data:
                    check_json_type(value, annotation, where, error, name)
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:  # a __post_init__ that refuses a value
        raise error(f"{where}: {exc}") from None

