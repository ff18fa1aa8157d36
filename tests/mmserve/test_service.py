"""The BentoML service over real HTTP on loopback: `bentoml serve` on a trained tiny registry, Pillow uploads.

One server for the session (tests/conftest.py `server`, started once, ~15 s); the registry swap test restores v1.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from _registry_fixture import (
    COLORS,
    Registries,
    brightness_image,
    color_image,
    fusion_sample,
    png_bytes,
    warmth_image,
)
from _server_fixture import BODY_LIMIT, PIXEL_LIMIT, Server, hermetic_env
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmserve.images import ImageDecoder, ImageError, decode_image, preprocess_from_config, split_preprocess
from mmserve.serving.auth import admin_authorized
from mmserve.serving.client import dropped_connection, engine_unavailable
from mmserve.wire import pack_pixels, pixels_to_tensor, unpack_pixels

ROOT = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).parent / "bentoml")
MAKERS = {"colors": color_image, "warmth": warmth_image, "brightness": brightness_image}
CLASSES = {"colors": list(COLORS), "warmth": ["warm", "cool"], "brightness": ["dark", "light"]}


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def upload(data: bytes, name: str = "image.png", mime: str = "image/png") -> dict[str, Any]:
    """httpx `files` for a multipart image upload."""
    return {"image": (name, data, mime)}


def image_bytes(task: str, label: str, seed: int, fmt: str = "PNG") -> bytes:
    """A fresh synthetic image of class `label` of `task`, encoded as `fmt`."""
    return png_bytes(MAKERS[task](label, np.random.default_rng(seed)), fmt)


def metric_samples(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics keyed by (name, labels)."""
    text = client.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when absent); labels not given are summed over."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def assert_json_error(resp: httpx.Response, status: int, fragment: str) -> dict[str, Any]:
    """A clear JSON 4xx: the expected status, an 'error' message containing `fragment`, no stack trace."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert fragment in body["error"], body
    assert "Traceback" not in resp.text
    return body


# ---- upload decoding (no server) ---------------------------------------------------------------------------------


def test_decode_composites_transparency_on_white_and_scales_16_bit() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = decode_image(png_bytes(rgba), PIXEL_LIMIT)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (2, 2), (0, 0))
    assert decode_image(png_bytes(la), PIXEL_LIMIT).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 255] * 256)
    pal.info["transparency"] = 0
    assert decode_image(png_bytes(pal), PIXEL_LIMIT).getpixel((0, 0)) == (255, 255, 255)
    grey16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert decode_image(png_bytes(grey16), PIXEL_LIMIT).getpixel((0, 0)) == (255, 255, 255)


def test_decode_refuses_bad_uploads(monkeypatch: pytest.MonkeyPatch) -> None:
    good = png_bytes(Image.new("RGB", (40, 30), (1, 2, 3)))
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", PIXEL_LIMIT)
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"%PDF-1.4 not an image", PIXEL_LIMIT)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(png_bytes(color_image("red", np.random.default_rng(0)))[:200], PIXEL_LIMIT)
    with pytest.raises(ImageError, match="40x30 = 1200 pixels, over the limit of 1000"):
        decode_image(good, 1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow's own bomb error is mapped too
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(good, PIXEL_LIMIT)


def test_pixel_wire_format_is_exact_and_refuses_bad_packets() -> None:
    pixels = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
    packed = pack_pixels(pixels)
    assert isinstance(packed, str) and len(packed) < 1.4 * pixels.nbytes
    assert np.array_equal(unpack_pixels(packed, 32), pixels)
    assert unpack_pixels(packed, 16).shape == (3 * 32 * 32,)  # wrong size: flat, so the engine's shape check refuses
    assert unpack_pixels("not base64!", 32).size == 0


def test_uint8_wire_gives_the_same_tensor_as_the_whole_transform() -> None:
    # open_clip's eval transform for a 96 px model: resize, crop, mode, ToTensor, Normalize
    cfg = {"size": [96, 96], "mode": "RGB", "mean": [0.48, 0.45, 0.40], "std": [0.26, 0.26, 0.27],
           "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    decoder = ImageDecoder(preprocess_from_config(cfg), PIXEL_LIMIT)
    rng = np.random.default_rng(3)
    upload = png_bytes(Image.fromarray(rng.integers(0, 256, (150, 200, 4), dtype=np.uint8), "RGBA"))
    pixels = decoder.pixels(upload)
    assert pixels.dtype == np.uint8 and pixels.shape == (96, 96, 3)
    packed = pack_pixels(pixels)
    assert len(packed) < 1.4 * 96 * 96 * 3  # a quarter of the float32 packet
    wire = unpack_pixels(packed, 96, "uint8")
    assert wire.shape == (96, 96, 3) and np.array_equal(wire, pixels)
    finish = split_preprocess(decoder.preprocess)[1]
    assert torch.equal(pixels_to_tensor(wire, finish), decoder(upload))  # bit-identical to the float path
    assert unpack_pixels(packed, 95, "uint8").ndim == 1  # wrong size: flat, refused by the engine's shape check
    # a transform of another shape (no trailing ToTensor + Normalize) keeps the float32 wire
    other = ImageDecoder(lambda img: torch.zeros(3, 8, 8), PIXEL_LIMIT)
    assert split_preprocess(other.preprocess) is None
    assert other.pixels(upload).dtype == np.float32 and other.pixels(upload).shape == (3, 8, 8)


def test_admin_token_is_checked_when_configured() -> None:
    for host in ("127.0.0.1", "203.0.113.7"):
        assert admin_authorized("Bearer s3cret", "s3cret", host)
        assert not admin_authorized(None, "s3cret", host) and not admin_authorized("Bearer wrong", "s3cret", host)
        assert not admin_authorized("s3cret", "s3cret", host)


def test_without_a_token_only_loopback_callers_may_reload() -> None:
    assert admin_authorized(None, None, "127.0.0.1") and admin_authorized("anything", None, "::1")
    for host in ("203.0.113.7", "10.0.0.2", "fe80::1", "testclient", None):
        assert not admin_authorized(None, None, host), host


def test_the_front_checks_task_names_with_the_engines_own_check() -> None:
    """The front's cached view and the engine's snapshot refuse a task name with the same error and message."""
    from mmserve.errors import RequestError
    from mmserve.serving.front import EngineView
    from mmserve.serving.statuses import error_body, status_for
    from mmserve.snapshot import Snapshot, TaskInfo

    infos = (TaskInfo("colors", "classify", None, (), {}), TaskInfo("pet", "fuse", None, (), {}))
    snapshot = Snapshot("v1", ROOT, "", infos, {}, {})
    view = EngineView("v1", {t.name: t.kind for t in infos}, {})
    for name, kind, status in (("nope", "classify", 404), ("pet", "classify", 400), ("colors", "fuse", 400),
                               ("nope", "fuse", 404)):
        refusals = []
        for check in (snapshot.require, view.require):
            with pytest.raises(RequestError) as err:
                check(name, kind)
            refusals.append((type(err.value), status_for(err.value), error_body(err.value)))
        assert refusals[0] == refusals[1] and refusals[0][1] == status, refusals


# ---- the running server ------------------------------------------------------------------------------------------


def test_probes_and_task_listing(server: Server, client: httpx.Client) -> None:
    for probe in ("/healthz", "/livez", "/readyz"):
        assert client.get(probe).status_code == 200, probe
    body = client.get("/tasks").json()
    assert body["registry_version"] == server.version(server.registries.v1)
    tasks = {t["name"]: t for t in body["tasks"]}
    assert list(tasks) == ["colors", "warmth", "brightness", "tags", "pet"]
    assert {n: t["kind"] for n, t in tasks.items()} == {"colors": "classify", "warmth": "classify",
                                                        "brightness": "classify", "tags": "fuse", "pet": "fuse"}
    assert tasks["colors"]["group"] == "synthetic" and tasks["brightness"]["group"] is None
    assert tasks["colors"]["classes"] == list(COLORS) and tasks["tags"]["classes"][-2:] == ["cat", "dog"]
    assert tasks["pet"]["metrics"] == {"synthetic_accuracy": 1.0} and tasks["tags"]["head"] == "multilabel"
    assert {n: t["endpoint"] for n, t in tasks.items()} == {"colors": "/classify", "warmth": "/classify",
                                                            "brightness": "/classify", "tags": "/fuse", "pet": "/fuse"}
    assert list(tasks["colors"])[:4] == ["name", "kind", "endpoint", "group"]


def test_classify_returns_the_trained_labels(server: Server, client: httpx.Client) -> None:
    version = server.version(server.registries.v1)
    formats = [("PNG", "image/png"), ("JPEG", "image/jpeg")]
    for n, (task, classes) in enumerate(CLASSES.items()):
        for m, label in enumerate(classes):
            fmt, mime = formats[(n + m) % 2]
            data = image_bytes(task, label, seed=500 + 10 * n + m, fmt=fmt)
            resp = client.post("/classify", params={"task": task, "top_k": 2}, files=upload(data, "x", mime))
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["label"] == label, (task, body)
            assert set(body) == {"task", "label", "score", "top_k", "registry_version"}
            assert body["task"] == task and body["registry_version"] == version
            assert [p["label"] for p in body["top_k"]][0] == label and len(body["top_k"]) == 2
            assert body["score"] == body["top_k"][0]["score"] >= body["top_k"][1]["score"]
    palette = MAKERS["colors"]("blue", np.random.default_rng(9)).convert("P", palette=Image.Palette.ADAPTIVE)
    resp = client.post("/classify", params={"task": "colors"}, files=upload(png_bytes(palette)))
    assert resp.json()["label"] == "blue" and len(resp.json()["top_k"]) == 3  # default top_k=5, 3 classes


def test_fuse_returns_labels_from_image_and_text(client: httpx.Client) -> None:
    for i, (img, text, color, animal) in enumerate(fusion_sample(np.random.default_rng(4321), 4)):
        tags = client.post("/fuse", params={"task": "tags"}, data={"text": text}, files=upload(png_bytes(img)))
        assert tags.status_code == 200, tags.text
        body = tags.json()
        assert {p["label"] for p in body["labels"]} == {color, animal}, (text, body)
        assert body["head"] == "multilabel" and body["threshold"] == 0.5 and len(body["scores"]) == 5
        assert all(p["score"] > 0.5 for p in body["labels"])
        pet = client.post("/fuse", data={"text": text, "task": "pet"}, files=upload(png_bytes(img)))
        assert pet.status_code == 200, pet.text
        assert pet.json()["label"] == animal and pet.json()["head"] == "multiclass", (i, text, pet.json())


def test_fuse_reads_the_text_exactly_as_sent(client: httpx.Client) -> None:
    """BentoML JSON-decodes text fields ('1.50' -> 1.5); the text tower must see the characters that were sent,
    except the quotes of a JSON string literal (BentoML's own client sends every text so: test_http_contract)."""
    image = upload(png_bytes(fusion_sample(np.random.default_rng(7), 1)[0][0]))

    def scores(text: str) -> list[float]:
        resp = client.post("/fuse", params={"task": "tags"}, data={"text": text}, files=image)
        assert resp.status_code == 200, resp.text
        return [p["score"] for p in resp.json()["scores"]]

    for sent, decoded in (("1.50", "1.5"), ("1e3", "1000.0"), ('"a" "b"', "a b")):
        assert scores(sent) != scores(decoded), sent
    assert scores("1.50") == scores("1.50")  # and the same text answers the same
    assert scores('"a red cat"') == scores("a red cat")  # a JSON string literal, decoded


def test_engine_failures_that_mean_retry_later() -> None:
    from bentoml.exceptions import InternalServerError, ServiceUnavailable

    assert engine_unavailable(ConnectionRefusedError()) and engine_unavailable(ServiceUnavailable("busy"))
    assert engine_unavailable(RuntimeError("Connection closed by the server"))
    assert not engine_unavailable(InternalServerError("bug")) and not engine_unavailable(ValueError("bug"))


def test_a_task_added_by_another_front_worker_is_found(tiny_backbone) -> None:
    """The front caches the engine's task list; a task it does not know makes it ask the engine once more."""
    from mmserve.images import preprocess_config
    from mmserve.serving.front import MmServe

    answers = [["colors"], ["colors", "added-elsewhere"]]  # what describe() returns, call after call
    calls: list[str] = []

    async def fake_call(name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(name)
        names = answers[min(len(calls), len(answers)) - 1]
        return {"registry_version": f"v{len(calls)}", "tasks": [{"name": n, "kind": "classify"} for n in names],
                "preprocess": preprocess_config(tiny_backbone)}

    front = MmServe.inner.__new__(MmServe.inner)  # no __init__: it would set this process's torch threads
    front._view, front._stale, front._decoder = None, True, None
    front._call = fake_call

    async def scenario() -> tuple[list[str], list[str]]:
        front._lock = asyncio.Lock()
        first = await front.view_for("colors")
        known = await front.view_for("colors")  # cached: no new call
        assert known is first and calls == ["describe"]
        found = await front.view_for("added-elsewhere")
        missing = await front.view_for("nope")  # asked again, and still unknown
        return sorted(found.kinds), sorted(missing.kinds)

    found, missing = asyncio.run(scenario())
    assert found == ["added-elsewhere", "colors"] == missing and calls == ["describe"] * 3


def _bomb() -> bytes:
    return png_bytes(Image.new("1", (1500, 1500), 0))  # 2.25 Mpx in a ~1 kB file; the test server allows 1 Mpx


RED = image_bytes("colors", "red", seed=1)
ERROR_CASES: list[tuple[str, str, Callable[[], dict[str, Any]], int, str]] = [
    ("unknown task", "/classify?task=nope", lambda: {"files": upload(RED)}, 404, "unknown task 'nope'"),
    ("missing task", "/classify", lambda: {"files": upload(RED)}, 422, "'task' is required"),
    ("fusion task on /classify", "/classify?task=tags", lambda: {"files": upload(RED)}, 400, "POST /fuse"),
    ("bad top_k", "/classify?task=colors&top_k=0", lambda: {"files": upload(RED)}, 400, "top_k"),
    ("not an image", "/classify?task=colors", lambda: {"files": upload(b"just some text\n" * 20, "a.txt",
                                                                          "text/plain")}, 400, "not an image"),
    ("truncated image", "/classify?task=colors", lambda: {"files": upload(RED[: len(RED) // 2])}, 400, "truncated"),
    ("empty file", "/classify?task=colors", lambda: {"files": upload(b"")}, 400, "empty upload"),
    ("decompression bomb", "/classify?task=colors", lambda: {"files": upload(_bomb())}, 400, "decompression bomb"),
    ("body over the limit", "/classify?task=colors", lambda: {"files": upload(os.urandom(BODY_LIMIT + 100_000))},
     413, "over the limit"),
    ("image sent as a text field", "/classify?task=colors", lambda: {"files": {"image": (None, b"http://x/a.png")}},
     400, "must be a file part"),
    ("missing image", "/classify?task=colors", lambda: {"files": {"other": ("a.png", RED, "image/png")}}, 422,
     "'image'"),
    ("JSON instead of multipart", "/classify?task=colors", lambda: {"json": {"image": "a.png"}}, 415,
     "multipart/form-data"),
    ("malformed multipart", "/classify?task=colors", lambda: {"content": b"garbage", "headers": {
        "content-type": "multipart/form-data; boundary=xyz"}}, 400, "malformed multipart"),
    ("missing text on /fuse", "/fuse?task=pet", lambda: {"files": upload(RED)}, 422, "'text' is required"),
    ("empty text on /fuse", "/fuse?task=pet", lambda: {"files": upload(RED), "data": {"text": "  "}}, 422,
     "must not be empty"),
    ("text sent as a file", "/fuse?task=pet", lambda: {"files": {**upload(RED), "text": ("t.txt", b"a cat")}}, 400,
     "must be a text field"),
    ("no task with several fusion tasks", "/fuse", lambda: {"files": upload(RED), "data": {"text": "a cat"}}, 422,
     "several fusion tasks"),
    ("unknown fusion task", "/fuse?task=nope", lambda: {"files": upload(RED), "data": {"text": "a cat"}}, 404,
     "unknown task 'nope'"),
    ("classify task on /fuse", "/fuse", lambda: {"files": upload(RED), "data": {"text": "x", "task": "colors"}}, 400,
     "POST /classify"),
    ("not an image on /fuse", "/fuse?task=pet", lambda: {"files": upload(b"GIF89a broken"), "data": {"text": "x"}},
     400, "not an image: the upload is in no format Pillow can identify"),
    ("extra file part", "/classify?task=colors", lambda: {"files": {**upload(RED), "foo": ("f.bin", b"\xff\xfe" * 8)}},
     400, "unexpected multipart field 'foo'; /classify takes: image, task, top_k, labels"),
    ("extra deeply nested text field", "/fuse?task=pet", lambda: {"files": upload(RED), "data": {
        "text": "a cat", "foo": "[" * 100_000}}, 400,
     "unexpected multipart field 'foo'; /fuse takes: image, text, task"),
    ("file name too long in bytes", "/classify?task=colors", lambda: {"files": upload(RED, "猫" * 90 + ".png")}, 400,
     "file name of 'image' is too long"),
    ("extreme aspect ratio", "/classify?task=colors", lambda: {"files": upload(png_bytes(Image.new("L", (1, 5000))))},
     400, "image is 1x5000 px: aspect ratio over 100:1"),
]


@pytest.mark.parametrize(("path", "request_kwargs", "status", "fragment"),
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_input_gets_a_clear_4xx(client: httpx.Client, path: str, request_kwargs: Callable, status: int,
                                    fragment: str) -> None:
    body = assert_json_error(client.post(path, **request_kwargs()), status, fragment)
    if status == 404:
        assert body["known_tasks"] in (["colors", "warmth", "brightness"], ["tags", "pet"])


async def _burst(url: str, requests: list[tuple[str, bytes]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return list(await asyncio.gather(*(c.post("/classify", params={"task": task}, files=upload(data))
                                           for task, data in requests)))


def test_mixed_task_burst_equals_single_answers_and_shares_batches(server: Server, client: httpx.Client) -> None:
    good = [(task, image_bytes(task, label, seed=900 + i))
            for i, (task, label) in enumerate((t, c) for t, cs in CLASSES.items() for c in cs for _ in range(3))]
    single = [client.post("/classify", params={"task": t}, files=upload(d)).json() for t, d in good]
    bad = [("nope", RED), ("colors", b"not an image at all"), ("tags", RED)]
    burst = good + bad
    order = list(range(len(burst)))
    random.Random(0).shuffle(order)
    before = metric_samples(client)
    responses = asyncio.run(_burst(server.url, [burst[i] for i in order]))
    after = metric_samples(client)
    by_index = dict(zip(order, responses, strict=True))
    for i, expected in enumerate(single):
        got = by_index[i]
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["label"] == expected["label"] and body["task"] == expected["task"]
        assert [p["label"] for p in body["top_k"]] == [p["label"] for p in expected["top_k"]]
        assert [p["score"] for p in body["top_k"]] == pytest.approx([p["score"] for p in expected["top_k"]], abs=1e-4)
    assert [by_index[len(good) + j].status_code for j in range(len(bad))] == [404, 400, 400]

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    batches = delta("mmserve_engine_batch_size_count", endpoint="classify")
    # every good request reached the engine, no bad one did, and concurrent requests shared forward passes...
    assert delta("mmserve_engine_batch_size_sum", endpoint="classify") == len(good)
    assert 1 <= batches < len(good)
    # ...including batches that mixed different tasks (bucket le=1: batches with a single distinct task)
    single_task_batches = delta("mmserve_engine_batch_tasks_bucket", endpoint="classify", le="1.0")
    assert single_task_batches < batches
    assert delta("bentoml_service_adaptive_batch_size_count", method_name="classify_batch") == batches


def test_sustained_concurrent_load_never_drops_an_engine_connection(server: Server) -> None:
    """BentoML's client to the engine renews its connection pool every `runner_connection.max_requests` calls
    (default 100), closing the old pool under calls still in flight; the engine's config keeps one pool."""
    offset = server.log.stat().st_size
    data = image_bytes("colors", "red", seed=5)
    responses = asyncio.run(_burst(server.url, [("colors", data)] * 240))
    assert [r.status_code for r in responses] == [200] * 240
    with server.log.open("rb") as f:
        f.seek(offset)
        assert b"engine connection dropped" not in f.read()


def test_metrics_count_requests_and_latency_per_task(client: httpx.Client) -> None:
    before = metric_samples(client)
    for seed in range(3):
        assert client.post("/classify", params={"task": "warmth"},
                           files=upload(image_bytes("warmth", "warm", seed))).status_code == 200
    assert client.post("/classify", params={"task": "warmth"}, files=upload(b"xx")).status_code == 400
    assert client.post("/classify", params={"task": "nope"}, files=upload(RED)).status_code == 404
    img, text = fusion_sample(np.random.default_rng(8), 1)[0][:2]
    assert client.post("/fuse", data={"text": text, "task": "pet"}, files=upload(png_bytes(img))).status_code == 200
    after = metric_samples(client)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("mmserve_requests_total", endpoint="/classify", task="warmth", status="200") == 3
    assert delta("mmserve_requests_total", endpoint="/classify", task="warmth", status="400") == 1
    assert delta("mmserve_requests_total", endpoint="/classify", task="-", status="404") == 1
    assert delta("mmserve_requests_total", endpoint="/fuse", task="pet", status="200") == 1
    assert delta("mmserve_requests_total", task="colors") == 0
    assert delta("mmserve_request_duration_seconds_count", endpoint="/classify", task="warmth") == 4
    assert delta("mmserve_request_duration_seconds_sum", endpoint="/classify", task="warmth") > 0


def test_registry_swap_while_requests_flow(server: Server, client: httpx.Client, tmp_path: Path) -> None:
    v1, v2 = server.version(server.registries.v1), server.version(server.registries.v2)
    expected = {v1: "red", v2: "crimson"}
    corrupt = tmp_path / "corrupt"
    shutil.copytree(server.registries.v1, corrupt)
    weights = next((corrupt / "tasks").glob("colors-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    wrong_types = tmp_path / "wrong-types"
    shutil.copytree(server.registries.v1, wrong_types)
    manifest = json.loads((wrong_types / "manifest.json").read_text())
    manifest["tasks"][0]["classes"] = 5
    (wrong_types / "manifest.json").write_text(json.dumps(manifest))
    seen: list[list[tuple[int, str, str]]] = [[], []]
    stop = threading.Event()

    def traffic(out: list[tuple[int, str, str]]) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/classify", params={"task": "colors"}, files=upload(RED))
                body = r.json()
                out.append((r.status_code, body.get("registry_version", ""), body.get("label", r.text)))

    def wait_for(predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not predicate():
            assert time.monotonic() < deadline, "traffic stalled"
            time.sleep(0.05)

    threads = [threading.Thread(target=traffic, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(s) >= 3 for s in seen))
        swap = client.post("/admin/reload", json={"path": str(server.registries.v2)})
        assert swap.status_code == 200, swap.text
        assert swap.json() | {"path": ""} == {"previous_version": v1, "version": v2, "changed": True, "path": "",
                                              "tasks": 5}
        mark = [len(s) for s in seen]
        wait_for(lambda: all(len(s) >= m + 3 for s, m in zip(seen, mark, strict=True)))
        body = assert_json_error(client.post("/admin/reload", json={"path": str(corrupt)}), 422, "sha256")
        assert body["serving_version"] == v2 and f"still serving {v2}" in body["error"]
        assert_json_error(client.post("/admin/reload", json={"path": str(tmp_path / "missing")}), 422, "no manifest")
        a_file = tmp_path / "registry.json"
        a_file.write_text("{}")
        assert_json_error(client.post("/admin/reload", json={"path": str(a_file)}), 422, "registry directory")
        assert_json_error(client.post("/admin/reload", json={"path": str(wrong_types)}), 422,
                          "tasks[0].classes: expected list[str], got 5")
        mark = [len(s) for s in seen]
        wait_for(lambda: all(len(s) >= m + 3 for s, m in zip(seen, mark, strict=True)))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for answers in seen:
        assert [a for a in answers if a[0] != 200] == []
        assert all(expected.get(version) == label for _, version, label in answers), answers
        versions = [version for _, version, _ in answers]
        first_v2 = versions.index(v2)
        assert first_v2 > 0 and set(versions[:first_v2]) == {v1} and set(versions[first_v2:]) == {v2}
    listing = client.get("/tasks").json()
    assert listing["registry_version"] == v2 and listing["tasks"][0]["classes"] == ["crimson", "lime", "navy"]
    assert client.post("/admin/reload", json={"path": str(server.registries.v1)}).json()["version"] == v1
    assert client.get("/tasks").json()["registry_version"] == v1


# ---- packaging ---------------------------------------------------------------------------------------------------


def test_bentoml_build_produces_a_bento_with_code_registry_and_backbone(
        tmp_path: Path, demo_registries: Registries, monkeypatch: pytest.MonkeyPatch) -> None:
    registries = demo_registries
    ctx = tmp_path / "ctx"
    shutil.copytree(ROOT / "mmserve", ctx / "mmserve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "bentofile.yaml", ctx)
    shutil.copytree(registries.v1, ctx / "models" / "registry")
    (ctx / "models" / "backbone").mkdir()
    (ctx / "models" / "backbone" / "mmserve-vit-p12-96.safetensors").write_bytes(b"stand-in weights")
    (ctx / "models" / "onnx").mkdir()
    (ctx / "models" / "onnx" / "image-tower.onnx").write_bytes(b"stand-in graph")
    (ctx / "tests").mkdir()
    (ctx / "tests" / "test_x.py").write_text("")
    home = tmp_path / "home"
    done = subprocess.run([BENTOML, "build", str(ctx)], cwd=ctx, env=hermetic_env(home), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    bentos = [p for p in (home / "bentos" / "mmserve").iterdir() if p.name != "latest"]
    assert len(bentos) == 1
    bento = bentos[0]
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["name"] == "mmserve" and meta["service"] == "mmserve.service:MmServe"
    assert {s["name"] for s in meta["services"]} == {"mmserve", "mmserve-engine"}
    src = bento / "src"
    assert (src / "models" / "registry" / "manifest.json").read_bytes() == \
        (registries.v1 / "manifest.json").read_bytes()
    assert len(list((src / "models" / "registry" / "tasks").glob("*.safetensors"))) == 5
    assert (src / "models" / "backbone" / "mmserve-vit-p12-96.safetensors").is_file()
    assert (src / "models" / "onnx" / "image-tower.onnx").is_file()
    assert (src / "mmserve" / "service.py").is_file() and (src / "mmserve" / "model_configs").is_dir()
    assert not (src / "tests").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    assert "torch==2.14.1" in requirements and "torchvision==0.29.1" in requirements
    # inside the bento, the default registry and backbone are the ones shipped in it
    spec = importlib.util.spec_from_file_location("bento_config", src / "mmserve" / "config.py")
    bento_config = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bento_config", bento_config)  # dataclasses look their module up there
    spec.loader.exec_module(bento_config)
    cfg = bento_config.ServeConfig.from_env({})
    assert cfg.registry == src / "models" / "registry"
    assert cfg.backbone_pretrained == str(src / "models" / "backbone" / "mmserve-vit-p12-96.safetensors")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec's, raised inside BentoML's config loader
def test_gpu_bentofile_is_a_valid_build_config() -> None:
    from bentoml._internal.bento.build_config import BentoBuildConfig

    with open(ROOT / "bentofile.gpu.yaml") as f:
        config = BentoBuildConfig.from_yaml(f).with_defaults()
    assert config.docker.cuda_version == "12.6.3" and config.docker.python_version == "3.11"
    assert "onnxruntime-gpu>=1.20" in config.python.packages
    assert not any(p.startswith("onnxruntime>") for p in config.python.packages)
    assert {e.name: e.value for e in config.envs}["MMSERVE_DEVICE"] == "cuda"


def test_dropped_engine_connections_are_recognised_for_retry():
    """The pooled client's closed-socket failures are retried / answered 503, other errors are not."""
    import aiohttp

    assert dropped_connection(aiohttp.ServerDisconnectedError())
    assert dropped_connection(aiohttp.ClientPayloadError("truncated"))
    assert dropped_connection(RuntimeError("Connection closed."))
    assert not dropped_connection(RuntimeError("CUDA out of memory"))
    assert not dropped_connection(ValueError("bad"))
