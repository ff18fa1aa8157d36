"""A bounded HTTP load generator: a fixed number of requests, at most `concurrency` in flight, latency per request."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
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


async def _run(base_url: str, make: Callable[[int], RequestSpec], n: int, concurrency: int,
               timeout: float) -> LoadResult:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < n:
                index = next_index
                next_index += 1
                spec = make(index)
                started = time.perf_counter()
                try:
                    response = await client.request(spec.method, spec.path, files=spec.files or None,
                                                    data=spec.data or None)
                    status = response.status_code
                except httpx.HTTPError as exc:
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
