"""A bounded HTTP load generator: a fixed number of requests, at most `concurrency` in flight, latency per request.

Built on aiohttp's client, not httpx: the generator shares the cores with the server it measures, and aiohttp
costs ~0.13 ms of CPU per multipart request at concurrency 32 where httpx's async client costs ~3 ms (measured
here against a bare Starlette app, docs/performance.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np


@dataclass(frozen=True)
class RequestSpec:
    """One request: method, path (with query) and multipart files / form fields."""

    path: str
    files: dict[str, tuple[str, bytes, str]] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


@dataclass
class LoadResult:
    """Throughput and latency of one load run (latencies in ms; errors by status, 0 = transport error)."""

    concurrency: int
    requests: int
    ok: int
    errors: dict[int, int]
    wall_s: float
    throughput: float  # successful requests per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    failures: dict[str, int] = field(default_factory=dict)  # transport errors by exception name (status 0)

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)


def _form(spec: RequestSpec) -> aiohttp.FormData | None:
    """The multipart body of a request, or None when it carries no files or fields."""
    if not spec.files and not spec.data:
        return None
    form = aiohttp.FormData()
    for name, (filename, content, content_type) in spec.files.items():
        form.add_field(name, content, filename=filename, content_type=content_type)
    for name, value in spec.data.items():
        form.add_field(name, value)
    return form


async def _run(base_url: str, make: Callable[[int], RequestSpec], n: int, concurrency: int,
               timeout: float) -> LoadResult:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async with aiohttp.ClientSession(base_url, connector=connector, timeout=client_timeout) as session:

        async def worker() -> None:
            nonlocal next_index
            while next_index < n:
                index = next_index
                next_index += 1
                spec = make(index)
                started = time.perf_counter()
                try:
                    async with session.request(spec.method, spec.path, data=_form(spec)) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = 0
                    failures[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000.0
    ok = statuses.pop(200, 0)
    return LoadResult(concurrency, n, ok, dict(statuses), wall, ok / wall if wall > 0 else 0.0,
                      float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                      float(ms.mean()), dict(failures))


def run_load(base_url: str, make: Callable[[int], RequestSpec], n: int, concurrency: int,
             timeout: float = 120.0) -> LoadResult:
    """Send requests make(0) .. make(n - 1) with at most `concurrency` in flight; wait for all of them."""
    if n < 1 or concurrency < 1:
        raise ValueError("need at least one request and a concurrency of at least 1")
    return asyncio.run(_run(base_url, make, n, concurrency, timeout))
