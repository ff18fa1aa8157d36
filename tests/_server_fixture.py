"""The demo server: `bentoml serve` on the demo registries, shared by every test that needs a live server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from _registry_fixture import SERVER_ENV, Registries

from mmserve.bench import bentoml_server

BODY_LIMIT = 300_000
PIXEL_LIMIT = 1_000_000
PLUGINS = Path(__file__).parent / "mmserve"  # where test_toy_method.py, a prompt method of its own, lives
TOY_METHOD = "test_toy_method"


@dataclass
class Server:
    """A running `bentoml serve` on 127.0.0.1."""

    url: str
    registries: Registries
    log: Path

    def version(self, registry: Path) -> str:
        """The manifest version of a registry directory."""
        return json.loads((registry / "manifest.json").read_text())["version"]


def hermetic_env(home: Path) -> dict[str, str]:
    """This process's environment without MMSERVE_* variables, with a private BentoML home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSERVE_")}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", OMP_NUM_THREADS="1")
    return env


@contextmanager
def demo_server(tmp: Path, registries: Registries, extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """Serve registries.v1 with small upload limits; the toy prompt method's module is importable and imported
    (MMSERVE_METHODS), as a user's own method would be, so its registries can be reloaded into this server;
    `extra_env` (the S3 server's endpoint and keys) lets it be reloaded onto a store in a bucket too."""
    env = hermetic_env(tmp / "bentoml") | SERVER_ENV | (extra_env or {}) | {
        "MMSERVE_REGISTRY": str(registries.v1),
        "MMSERVE_MAX_BODY_BYTES": str(BODY_LIMIT),
        "MMSERVE_MAX_IMAGE_PIXELS": str(PIXEL_LIMIT),
        "MMSERVE_MAX_LATENCY_MS": "20000",  # a shared 2-core box: never shed load in tests
        "MMSERVE_METHODS": TOY_METHOD,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
    }
    log = tmp / "server.log"
    with bentoml_server(env, log, ready_timeout=180) as url:  # the same launcher `mmserve bench` uses
        yield Server(url, registries, log)
