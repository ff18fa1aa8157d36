"""Service configuration, read once from MMSERVE_* environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from mmserve.backbone import EMBEDDED_MODEL, BackboneSpec, pretrained_or_none
from mmserve.errors import MmserveError

RUNTIMES = ("torch", "onnx")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")  # MMSERVE_DEVICE values (lower-cased)


class ConfigError(MmserveError, ValueError):
    """An MMSERVE_* variable has a value the service cannot use; the message names the variable."""


def read_device(env: Mapping[str, str], default: str | None = "cpu") -> str | None:
    """MMSERVE_DEVICE (the one reader of it): cpu, cuda or cuda:N, lower-cased; `default` when unset or blank."""
    device = (env.get("MMSERVE_DEVICE") or "").strip().lower()
    if not device:
        return default
    if not DEVICE.fullmatch(device):
        raise ConfigError(f"MMSERVE_DEVICE={device!r}: expected cpu, cuda or cuda:N")
    return device


def project_root() -> Path:
    """The directory holding `mmserve/` and `models/`: the repository, or `src/` inside a built bento."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "models").is_dir() else Path.cwd()


def _default_checkpoint(root: Path, model: str) -> Path:
    """models/backbone/<model>.safetensors; a model other than the embedded one must have that file, or
    MMSERVE_BACKBONE_PRETRAINED must say where its weights are."""
    checkpoint = root / "models" / "backbone" / f"{model}.safetensors"
    if model != EMBEDDED_MODEL and not checkpoint.is_file():
        raise ConfigError(f"MMSERVE_BACKBONE_MODEL={model!r} without MMSERVE_BACKBONE_PRETRAINED: there is no "
                          f"{checkpoint}; set MMSERVE_BACKBONE_PRETRAINED to a checkpoint path or an open_clip tag "
                          f"(e.g. openai), or 'none' for random weights")
    return checkpoint


def _admin_token(raw: str | None) -> str | None:
    """MMSERVE_ADMIN_TOKEN: unset or empty = none; otherwise printable ASCII without spaces, the characters an HTTP
    `Authorization: Bearer` header carries as sent (a token with others, or all blanks, could never match)."""
    if not raw:
        return None
    if not all(33 <= ord(c) <= 126 for c in raw):
        raise ConfigError("MMSERVE_ADMIN_TOKEN: use printable ASCII without spaces (e.g. `openssl rand -hex 32`)")
    return raw


def _number(env: Mapping[str, str], name: str, default: float, minimum: float, kind: type = int):
    """A numeric MMSERVE_* variable of `kind` (int or float), at least `minimum`; `default` when unset or blank."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not value >= minimum:  # also refuses NaN
        raise ConfigError(f"{name}={value}: must be >= {minimum}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    return _number(env, name, default, minimum, int)


def _float(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    return _number(env, name, default, minimum, float)


def registry_location(value: str | Path) -> Path | str:
    """A registry as MMSERVE_REGISTRY or a command names it: a local path (Path) or an fsspec URL (str, kept
    verbatim: Path would fold the '//' of s3://bucket/prefix)."""
    text = str(value)
    return text if "://" in text and not text.startswith("file://") else Path(text.removeprefix("file://"))


@dataclass(frozen=True)
class ServeConfig:
    """Everything the service reads from its environment; see `ENV` for the variable of each field."""

    registry: Path | str  # a local path, or an fsspec URL (s3://bucket/prefix)
    backbone_model: str = EMBEDDED_MODEL
    backbone_pretrained: str | None = None  # open_clip tag or checkpoint path; None = random init (tests)
    backbone_seed: int = 0
    device: str = "cpu"
    runtime: str = "torch"
    max_batch_size: int = 32
    max_latency_ms: int = 1000  # BentoML's queueing deadline: requests that would wait longer get 503
    max_body_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    admin_token: str | None = None
    registry_poll_s: float = 2.0  # every engine worker checks the store's current version this often (0: never)
    engine_workers: int = 1
    max_resident_tasks: int | None = None  # classify tasks kept in memory, least recently used evicted (None: all)

    def backbone_spec(self) -> BackboneSpec:
        """The backbone this configuration asks for."""
        return BackboneSpec(self.backbone_model, self.backbone_pretrained, self.device, self.backbone_seed)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeConfig:
        """Read MMSERVE_* variables (defaults: the embedded backbone and registry under `models/`)."""
        env = os.environ if env is None else env
        root = project_root()
        registry = registry_location(env.get("MMSERVE_REGISTRY") or root / "models" / "registry")
        model = env.get("MMSERVE_BACKBONE_MODEL") or EMBEDDED_MODEL
        pretrained = env.get("MMSERVE_BACKBONE_PRETRAINED")
        if pretrained is None:
            pretrained = str(_default_checkpoint(root, model))
        else:
            pretrained = pretrained_or_none(pretrained)
        device = read_device(env)
        runtime = (env.get("MMSERVE_RUNTIME") or "torch").strip().lower()
        if runtime not in RUNTIMES:
            raise ConfigError(f"MMSERVE_RUNTIME={runtime!r}: expected one of {', '.join(RUNTIMES)}")
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(
            registry=registry,
            backbone_model=model,
            backbone_pretrained=pretrained,
            backbone_seed=_int(env, "MMSERVE_BACKBONE_SEED", defaults["backbone_seed"], 0),
            device=device,
            runtime=runtime,
            # BentoML requires max_batch_size > 1
            max_batch_size=_int(env, "MMSERVE_MAX_BATCH_SIZE", defaults["max_batch_size"], 2),
            max_latency_ms=_int(env, "MMSERVE_MAX_LATENCY_MS", defaults["max_latency_ms"], 1),
            max_body_bytes=_int(env, "MMSERVE_MAX_BODY_BYTES", defaults["max_body_bytes"], 1024),
            max_image_pixels=_int(env, "MMSERVE_MAX_IMAGE_PIXELS", defaults["max_image_pixels"], 1),
            admin_token=_admin_token(env.get("MMSERVE_ADMIN_TOKEN")),
            registry_poll_s=_float(env, "MMSERVE_REGISTRY_POLL_S", defaults["registry_poll_s"], 0.0),
            engine_workers=_int(env, "MMSERVE_ENGINE_WORKERS", defaults["engine_workers"], 1),
            max_resident_tasks=(_int(env, "MMSERVE_MAX_RESIDENT_TASKS", 0, 1)
                                if env.get("MMSERVE_MAX_RESIDENT_TASKS", "").strip() else None),
        )


ENV = {
    "registry": "MMSERVE_REGISTRY",
    "backbone_model": "MMSERVE_BACKBONE_MODEL",
    "backbone_pretrained": "MMSERVE_BACKBONE_PRETRAINED",
    "backbone_seed": "MMSERVE_BACKBONE_SEED",
    "device": "MMSERVE_DEVICE",
    "runtime": "MMSERVE_RUNTIME",
    "max_batch_size": "MMSERVE_MAX_BATCH_SIZE",
    "max_latency_ms": "MMSERVE_MAX_LATENCY_MS",
    "max_body_bytes": "MMSERVE_MAX_BODY_BYTES",
    "max_image_pixels": "MMSERVE_MAX_IMAGE_PIXELS",
    "admin_token": "MMSERVE_ADMIN_TOKEN",
    "registry_poll_s": "MMSERVE_REGISTRY_POLL_S",
    "engine_workers": "MMSERVE_ENGINE_WORKERS",
    "max_resident_tasks": "MMSERVE_MAX_RESIDENT_TASKS",
}
