"""The service's configuration: read from the environment once, when the service is imported."""

from __future__ import annotations

from mmserve.config import ServeConfig

CONFIG = ServeConfig.from_env()
