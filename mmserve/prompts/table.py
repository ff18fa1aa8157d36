"""The method table: every prompt method is one module plus one `register_method` call, and loading dispatches here.

A classification method's module is built as `module_cls(config, text_width, vision_width, text_layers,
vision_layers)` and its `forward()` returns TowerPrompts; the engine, the trainers and the ONNX graphs only ever see
those prompts, so a new method needs nothing else. A fusion method's module is built as `module_cls(config,
vision_width, vision_layers, embed_dim, psi_dim, n_classes, head)` (see mmserve.fusion.FusionModel).

A method's config is a dataclass whose `type` field defaults to the method's name: that is the `type` of its
prompt_config in a registry manifest. `choices` name the `--prompt` values of mmserve-train that pick it, each with
the config fields it fixes (the deep-prompt method is `text` and `vision`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from torch import nn

from mmserve.errors import PromptConfigError
from mmserve.strict import from_dict

KINDS = ("classify", "fuse")
PLUGINS_ENV = "MMSERVE_METHODS"  # comma-separated modules to import for their register_method calls
ENTRY_POINTS = "mmserve.methods"  # or a package's entry points of this group (each a module to import)


@dataclass(frozen=True)
class ResultRow:
    """A row a method adds to the accuracy table (`mmserve-train results`): its key, label and definition."""

    key: str
    label: str
    definition: str
    choice: str  # the --prompt value the row trains
    sharing: str = "task"  # group+task | task | group


@dataclass(frozen=True)
class Method:
    """One registered prompt method."""

    name: str  # prompt_config["type"] in a manifest
    kind: str  # "classify" or "fuse"
    config_cls: type
    module_cls: type
    choices: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    summary: str = ""
    results: tuple[ResultRow, ...] = ()

    def config_from_dict(self, data: Mapping[str, Any]) -> Any:
        """Rebuild this method's config from its manifest dict, refusing unknown fields."""
        return from_dict(self.config_cls, data, f"{self.name} prompt config", PromptConfigError)


_METHODS: dict[str, Method] = {}
_plugins_loaded = False


def load_plugins(env: Mapping[str, str] | None = None) -> None:
    """Import the method modules MMSERVE_METHODS and the `mmserve.methods` entry points name (once a process)."""
    global _plugins_loaded
    if _plugins_loaded and env is None:
        return
    _plugins_loaded = True
    env = os.environ if env is None else env
    names = [n.strip() for n in (env.get(PLUGINS_ENV) or "").split(",") if n.strip()]
    names += [ep.value for ep in entry_points(group=ENTRY_POINTS)]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a plugin that fails to import must say which one, not just how
            raise PromptConfigError(f"{PLUGINS_ENV}/{ENTRY_POINTS}: cannot import method module {name!r}: "
                                    f"{exc.__class__.__name__}: {exc}") from None


def register_method(name: str, config_cls: type, module_cls: type, *, kind: str = "classify",
                    choices: Mapping[str, Mapping[str, Any]] | None = None, summary: str = "",
                    results: tuple[ResultRow, ...] = ()) -> Method:
    """Add a prompt method to the table (or replace the one of that name); returns its entry."""
    if kind not in KINDS:
        raise PromptConfigError(f"method {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if not is_dataclass(config_cls):
        raise PromptConfigError(f"method {name!r}: its config {config_cls.__name__} must be a dataclass")
    type_field = next((f for f in fields(config_cls) if f.name == "type"), None)
    if type_field is None or type_field.default != name:
        raise PromptConfigError(f"method {name!r}: {config_cls.__name__} needs a field `type: str = {name!r}`")
    choices = {name: {}} if choices is None else choices
    for choice in choices:
        owner = next((m for m in _METHODS.values() if choice in m.choices and m.name != name), None)
        if owner is not None:
            raise PromptConfigError(f"method {name!r}: choice {choice!r} is already method {owner.name!r}'s")
    method = Method(name, kind, config_cls, module_cls,
                    MappingProxyType({c: MappingProxyType(dict(v)) for c, v in choices.items()}), summary,
                    tuple(results))
    _METHODS[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method from the table (tests that register a toy method clean up with this)."""
    _METHODS.pop(name, None)


def methods(kind: str | None = None) -> list[Method]:
    """Registered methods (of one kind), in registration order."""
    load_plugins()
    return [m for m in _METHODS.values() if kind is None or m.kind == kind]


def get_method(name: str | None, kind: str | None = None) -> Method:
    """The method a manifest's prompt_config `type` names; PromptConfigError when none (or of another kind)."""
    load_plugins()
    method = _METHODS.get(name) if isinstance(name, str) else None
    if method is None or (kind is not None and method.kind != kind):
        known = sorted(m.name for m in methods(kind))
        raise PromptConfigError(f"unknown prompt config type {name!r} (known: {known})")
    return method


def prompt_choices(kind: str = "classify") -> list[str]:
    """Every `--prompt` value of mmserve-train for methods of `kind`."""
    return [c for m in methods(kind) for c in m.choices]


def method_for_choice(choice: str, kind: str = "classify") -> tuple[Method, Mapping[str, Any]]:
    """The method a `--prompt` value picks and the config fields that value fixes."""
    for m in methods(kind):
        if choice in m.choices:
            return m, m.choices[choice]
    raise PromptConfigError(f"prompt kind must be one of {prompt_choices(kind)}, got {choice!r}")


def config_for_choice(choice: str, options: Mapping[str, Any], kind: str = "classify") -> Any:
    """The config a `--prompt` value builds: its fixed fields, then every option whose name is a config field."""
    method, fixed = method_for_choice(choice, kind)
    names = {f.name for f in fields(method.config_cls)} - {"type"}
    values = {k: v for k, v in options.items() if k in names}
    return method.config_cls(**{**values, **fixed})


def config_from_dict(data: Mapping[str, Any], kind: str | None = None) -> Any:
    """Rebuild a prompt config from its manifest dict through the method its `type` names."""
    if not isinstance(data, Mapping):
        raise PromptConfigError(f"a prompt config must be an object, got {type(data).__name__}")
    return get_method(data.get("type"), kind).config_from_dict(data)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config's manifest dict (its `type` included)."""
    return asdict(config)


def method_of(config: Any) -> Method:
    """The registered method of a config object."""
    return get_method(getattr(config, "type", None))


def build_classify_module(config: Any, text_width: int, vision_width: int, text_layers: int,
                          vision_layers: int) -> nn.Module:
    """Instantiate the classification prompt module that `config` (object or manifest dict) describes."""
    if isinstance(config, Mapping):
        config = config_from_dict(config, "classify")
    method = get_method(getattr(config, "type", None), "classify")
    if not isinstance(config, method.config_cls):
        raise PromptConfigError(f"not a prompt config: {config!r}")
    return method.module_cls(config, text_width, vision_width, text_layers, vision_layers)
