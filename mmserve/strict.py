"""The one strict loader: a JSON object to a dataclass, refusing unknown, missing and wrongly typed fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import TypeVar

from mmserve.errors import MmserveError

T = TypeVar("T")

# JSON types each field annotation admits (annotations are strings under `from __future__ import annotations`)
_JSON_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                            "dict": (dict,), "list[str]": (list,), "list[int]": (list,)}
_ITEM_TYPES: dict[str, type] = {"list[str]": str, "list[int]": int}


def check_json_type(value: object, annotation: str, where: str, error: type[Exception] = MmserveError) -> None:
    """Refuse a value whose JSON type does not fit a field's annotation (bool is not a number, nor a number bool)."""
    base = annotation.removesuffix(" | None")
    if value is None and base != annotation:
        return
    types = _JSON_TYPES.get(base)
    if types is None:  # nested dataclasses and other annotations: built and checked by the caller
        return
    item = _ITEM_TYPES.get(base)
    wrong_bool = isinstance(value, bool) and bool not in types
    if not isinstance(value, types) or wrong_bool or (item is not None and not all(
            isinstance(x, item) and not isinstance(x, bool) for x in value)):
        raise error(f"{where}: expected {base}, got {json.dumps(value)[:80]}")


def from_dict(cls: type[T], data: object, where: str, error: type[Exception] = MmserveError, *,
              check_types: bool = True) -> T:
    """Construct dataclass `cls` from a dict, naming `where` and the field on any mismatch of name or type."""
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise error(f"{where}: unknown field(s) {sorted(unknown)}")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = required - set(data)
    if missing:
        raise error(f"{where}: missing field(s) {sorted(missing)}")
    if check_types:
        for f in fields(cls):
            if f.name in data:
                check_json_type(data[f.name], str(f.type), f"{where}.{f.name}", error)
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:  # a __post_init__ that refuses a value
        raise error(f"{where}: {exc}") from None

