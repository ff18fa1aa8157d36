"""The front's calls to the engine service: retries on dropped pooled connections, failures that mean retry later."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

logger = logging.getLogger("mmserve")

ENGINE_ATTEMPTS = 3  # calls to the internal engine service: first try + retries on a dropped connection


def dropped_connection(exc: BaseException) -> bool:
    """True for the transient failures of BentoML's pooled client to the engine (a closed keep-alive socket)."""
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return True
    return isinstance(exc, RuntimeError) and "Connection closed" in str(exc)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a BentoML error carries (e.g. 503 when the batch queue sheds load), else None."""
    return getattr(getattr(exc, "error_code", None), "value", None)


def engine_unavailable(exc: BaseException) -> bool:
    """True when a call to the engine failed because it is unreachable, restarting or shedding load (503)."""
    return dropped_connection(exc) or isinstance(exc, ConnectionError) or http_status(exc) == 503


async def call_engine(engine: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call API `name` of the engine service: a remote proxy when served, a local instance in-process."""
    client = getattr(engine, "to_async", None)
    if client is None:
        return await asyncio.to_thread(getattr(engine, name), *args, **kwargs)
    # BentoML's internal client can fail a call with "server disconnected": a pooled connection the engine's
    # server already closed (bentoml/BentoML#4971), or the pool renewed (by age, see MmServeEngine) under calls
    # in flight; every engine API is idempotent, so retrying on a fresh connection is safe
    for attempt in range(ENGINE_ATTEMPTS):
        try:
            return await getattr(client, name)(*args, **kwargs)
        except Exception as exc:
            if not dropped_connection(exc) or attempt == ENGINE_ATTEMPTS - 1:
                raise
            logger.warning("engine connection dropped during %s (%s); retrying", name, exc.__class__.__name__)
