"""Prometheus metrics for /metrics: per-task requests and latency (front), batch sizes and task mixes (engine)."""

from __future__ import annotations

from collections.abc import Mapping

NO_TASK = "-"  # metrics label for requests whose task is missing or unknown (keeps label values bounded)


class EngineMetrics:
    """Engine-side Prometheus metrics: how many requests and distinct tasks each forward batch carried."""

    def __init__(self) -> None:
        import prometheus_client as prom  # imported in the worker, after BentoML set up multiprocess mode

        buckets = (1, 2, 4, 8, 16, 32, 64, 128)
        self.batch_size = prom.Histogram("mmserve_engine_batch_size", "Requests per engine batch",
                                         ["endpoint"], buckets=buckets)
        self.batch_tasks = prom.Histogram("mmserve_engine_batch_tasks", "Distinct tasks per engine batch",
                                          ["endpoint"], buckets=buckets)
        self.residency = prom.Counter("mmserve_resident_tasks", "Classify task lookups: hit (in memory), miss "
                                      "(loaded from the store), eviction (dropped, least recently used)", ["event"])
        self.resident = prom.Gauge("mmserve_resident_tasks_in_memory", "Classify tasks in memory, per engine worker",
                                   multiprocess_mode="livesum")
        self._seen = {"hits": 0, "misses": 0, "evictions": 0}

    def observe(self, endpoint: str, tasks: list[str]) -> None:
        """Record one batch."""
        self.batch_size.labels(endpoint=endpoint).observe(len(tasks))
        self.batch_tasks.labels(endpoint=endpoint).observe(len(set(tasks)))

    def observe_residency(self, stats: Mapping[str, int | None]) -> None:
        """Count what the engine's resident tasks did since the last call (ResidentTasks.stats())."""
        for counter, event in (("hits", "hit"), ("misses", "miss"), ("evictions", "eviction")):
            now = int(stats[counter] or 0)
            if now > self._seen[counter]:
                self.residency.labels(event=event).inc(now - self._seen[counter])
            self._seen[counter] = now
        self.resident.set(int(stats["resident"] or 0))


class ServiceMetrics:
    """Per-task request counts and latency for /metrics."""

    def __init__(self) -> None:
        import prometheus_client as prom  # imported in the worker, after BentoML set up multiprocess mode

        self.requests = prom.Counter("mmserve_requests", "Requests answered, per endpoint, task and HTTP status",
                                     ["endpoint", "task", "status"])
        self.latency = prom.Histogram("mmserve_request_duration_seconds", "Request latency per endpoint and task",
                                      ["endpoint", "task"],
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def record(self, endpoint: str, task: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint=endpoint, task=task, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint, task=task).observe(seconds)
