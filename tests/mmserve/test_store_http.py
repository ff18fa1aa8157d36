"""Two servers on one store in a SeaweedFS bucket, one of them with two engine workers: a change made through
either (or by anyone writing the store) is served by every worker of both within the poll interval + 1 s. The
two-worker server keeps one classify task in memory per worker (MMSERVE_MAX_RESIDENT_TASKS=1): the others load
from the bucket on first use.

The second server is the session's demo server, reloaded onto the store for this module and back to v1 after."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from _registry_fixture import brightness_image, png_bytes
from _server_fixture import hermetic_env
from prometheus_client.parser import text_string_to_metric_families

from mmserve.bench import bentoml_server
from mmserve.store import Store
from mmserve.versions import add_tasks, remove_tasks

POLL_S = 1.0
SLOWEST_POLL_S = 2.0  # the demo server polls at the default interval


@pytest.fixture(scope="module")
def fleet(s3, demo_registries, server, tmp_path_factory):
    """A store in a bucket holding v1's colors and warmth; a new server on it with 2 engine workers polling every
    POLL_S, and the session's server reloaded onto it."""
    from _registry_fixture import SERVER_ENV

    url = s3.bucket("mmserve-fleet") + "/registry"
    add_tasks(Store.open(url), demo_registries.v1, ["colors", "warmth"])
    tmp = tmp_path_factory.mktemp("fleet")
    env = hermetic_env(tmp / "bentoml") | SERVER_ENV | s3.env | {
        "MMSERVE_REGISTRY": url, "MMSERVE_REGISTRY_POLL_S": str(POLL_S), "MMSERVE_MAX_LATENCY_MS": "20000",
        "MMSERVE_ENGINE_WORKERS": "2", "MMSERVE_MAX_RESIDENT_TASKS": "1"}
    swap = httpx.post(f"{server.url}/admin/reload", json={"path": url}, timeout=120)
    assert swap.status_code == 200, swap.text
    try:
        with bentoml_server(env, tmp / "server.log", ready_timeout=240) as two_workers:
            yield url, [two_workers, server.url]
    finally:
        assert httpx.post(f"{server.url}/admin/reload", json={"path": str(demo_registries.v1)},
                          timeout=120).status_code == 200


def _brightness_answers(urls: list[str], n: int = 6) -> list[int]:
    """Status of n /classify?task=brightness requests to each server (several per engine worker)."""
    image = png_bytes(brightness_image("dark", np.random.default_rng(0)))
    codes = []
    for url in urls:
        for _ in range(n):
            codes.append(httpx.post(f"{url}/classify", params={"task": "brightness"}, timeout=60,
                                    files={"image": ("d.png", image, "image/png")}).status_code)
    return codes


def test_a_change_through_one_server_reaches_every_worker_of_both(fleet, demo_registries) -> None:
    store_url, urls = fleet
    assert set(_brightness_answers(urls, 2)) == {404}
    added = httpx.post(f"{urls[1]}/admin/tasks", json={"source": str(demo_registries.v1), "tasks": ["brightness"]},
                       timeout=120)
    assert added.status_code == 200, added.text
    version = added.json()["registry_version"]
    time.sleep(SLOWEST_POLL_S + 1.0)
    assert set(_brightness_answers(urls)) == {200}  # from poll interval + 1 s on, on either server
    for url in urls:
        assert httpx.get(f"{url}/tasks", timeout=30).json()["registry_version"] == version


def test_a_change_by_another_writer_is_followed_and_a_stale_one_is_409(fleet, demo_registries) -> None:
    store_url, urls = fleet
    store = Store.open(store_url)
    before = store.head().version
    moved = remove_tasks(store, ["brightness"]) if "brightness" in _tasks(urls[0]) else add_tasks(
        store, demo_registries.v1, ["brightness"])
    time.sleep(SLOWEST_POLL_S + 1.0)
    for url in urls:
        assert httpx.get(f"{url}/tasks", timeout=30).json()["registry_version"] == moved.version
    stale = httpx.post(f"{urls[0]}/admin/tasks/delete", json={"tasks": ["warmth"], "expected_version": before},
                       timeout=60)
    assert stale.status_code == 409, stale.text
    assert "re-read" in stale.json()["error"] and stale.json()["registry_version"] == moved.version
    bad = httpx.post(f"{urls[0]}/admin/tasks", json={"source": "/nowhere/registry"}, timeout=60)
    assert bad.status_code == 422 and "/nowhere/registry" in bad.json()["error"], bad.text
    back = httpx.post(f"{urls[0]}/admin/rollback", json={}, timeout=120)
    assert back.status_code == 200 and back.json()["registry_version"] == before, back.text
    assert Store.open(store_url).head().version == before


def _tasks(url: str) -> list[str]:
    return [t["name"] for t in httpx.get(f"{url}/tasks", timeout=30).json()["tasks"]]


def _residency(url: str) -> dict[str, float]:
    """The bounded server's residency counters, summed over its engine workers."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.labels["event"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "mmserve_resident_tasks_total"}


def test_a_bounded_server_loads_cold_tasks_from_the_bucket_and_counts_them(fleet) -> None:
    _, urls = fleet
    image = png_bytes(brightness_image("dark", np.random.default_rng(0)))
    before = _residency(urls[0])
    for task in ["colors", "warmth"] * 4:  # one resident task per worker: every switch is a load and an eviction
        answer = httpx.post(f"{urls[0]}/classify", params={"task": task}, timeout=60,
                            files={"image": ("d.png", image, "image/png")})
        assert answer.status_code == 200 and answer.json()["task"] == task, answer.text
    after = _residency(urls[0])
    gained = {event: after.get(event, 0) - before.get(event, 0) for event in ("hit", "miss", "eviction")}
    assert sum(gained.values()) >= 8 and gained["miss"] >= 2 and gained["eviction"] >= 1, gained
