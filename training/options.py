"""Command-line options declared with the config fields they set.

A field made by `option(default, help=..., flag=...)` carries its Opt in the field's metadata: the flag
(default --field-name), help and argparse extras live beside the field, and the default is the field's own.
`add_options` adds a config's options to a parser (or group), `from_args` builds the config back from the
parsed arguments, reading the same fields; the namespace attribute of an option is its field's name. For a
config whose class does not carry Opts (one defined outside training/), a table {field name: Opt} does.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")
CLI = "cli"  # the metadata key of a field's Opt

_SCALARS: dict[str, Callable[[str], Any]] = {"int": int, "float": float}


@dataclass(frozen=True)
class Opt:
    """How one config field is given on the command line (everything left None is derived from the field)."""

    flag: str | None = None  # default --field-name; a bool field that defaults to True takes a --no-... flag
    help: str | Callable[[Any], str] | None = None  # a callable gets the option's default
    type: Callable[[str], Any] | None = None  # default: int or float from the annotation, else the string
    choices: Sequence | Callable[[], Sequence] | None = None  # a callable is read when the parser is built
    metavar: str | None = None
    action: type[argparse.Action] | None = None


def option(default: Any = MISSING, opt: Opt | None = None, *, default_factory: Any = MISSING, **kw: Any) -> Any:
    """A dataclass field with its command-line option: `opt` (one shared by several configs) or Opt(**kw)."""
    if opt is not None and kw:
        raise TypeError(f"option(): give a shared Opt or its keywords {sorted(kw)}, not both")
    return field(default=default, default_factory=default_factory, metadata={CLI: opt or Opt(**kw)})


def comma_list(value: str) -> list[str] | None:
    """argparse type of a comma-separated list ('a,b'); an empty string means none."""
    return [t for t in value.split(",") if t] if value else None


def field_value(value: str) -> tuple[str, str]:
    """argparse type of a FIELD=VALUE option (e.g. --select task=noto)."""
    name, sep, wanted = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (e.g. task=noto), got {value!r}")
    return name, wanted


def options_of(cls: type, table: Mapping[str, Opt] | None = None) -> dict[str, tuple[Field, Opt]]:
    """The fields of `cls` that have an option (from `table` when given, else from the fields' metadata)."""
    by_name = {f.name: f for f in fields(cls)}
    if table is not None:
        return {name: (by_name[name], opt) for name, opt in table.items()}
    return {f.name: (f, f.metadata[CLI]) for f in fields(cls) if CLI in f.metadata}


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _argparse_kwargs(f: Field, opt: Opt, default: Any) -> tuple[str, dict]:
    """The flag and add_argument keywords of field `f`'s option."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = annotation.removesuffix(" | None")
    flag = opt.flag or "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {"dest": f.name}
    if default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = default
    if opt.help is not None:
        kw["help"] = opt.help(default) if callable(opt.help) else opt.help
    if base == "bool" and opt.action is None:
        if default is True and not flag.startswith("--no-"):
            raise ValueError(f"{f.name}: a flag that turns a default-True option off is spelt --no-..., got {flag}")
        kw["action"] = "store_false" if default is True else "store_true"
        return flag, kw
    if opt.action is not None:
        kw["action"] = opt.action
    if opt.type is not None:
        kw["type"] = opt.type
    elif base.startswith("list["):
        kw["nargs"] = "+"
        item = base.removeprefix("list[").removesuffix("]")
        if item in _SCALARS:
            kw["type"] = _SCALARS[item]
    elif base in _SCALARS:
        kw["type"] = _SCALARS[base]
    if opt.choices is not None:
        kw["choices"] = tuple(opt.choices() if callable(opt.choices) else opt.choices)
    else:  # what argparse would show for an option whose attribute were named after its flag
        kw["metavar"] = opt.metavar or flag.removeprefix("--").replace("-", "_").upper()
    return flag, kw


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                only: Iterable[str] | None = None, skip: Iterable[str] = (), defaults: Mapping[str, Any] | None = None,
                table: Mapping[str, Opt] | None = None) -> None:
    """Add the options of config `cls` (those named in `only`, in that order, less `skip`) to `parser`.

    A field's default is the option's, unless `defaults` gives another (a subcommand's own, e.g. its run dir); a
    field with neither is a required option.
    """
    known = options_of(cls, table)
    names = list(only) if only is not None else list(known)
    for name in names:
        if name in skip:
            continue
        f, opt = known[name]
        default = defaults[name] if defaults is not None and name in defaults else _default(f)
        flag, kw = _argparse_kwargs(f, opt, default)
        parser.add_argument(flag, **kw)


def from_args(cls: type[T], args: argparse.Namespace, *, table: Mapping[str, Opt] | None = None, **given: Any) -> T:
    """Config `cls` from parsed arguments: every option field the parser has, then `given` (nested configs)."""
    values = {name: getattr(args, name) for name in options_of(cls, table) if hasattr(args, name)}
    return cls(**(values | given))


class FieldValues(argparse.Action):
    """Repeatable FIELD=VALUE option (its type gives (field, value) pairs) collected into a dict."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        name, wanted = values
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), name: wanted})
