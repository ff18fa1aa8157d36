"""The HTTP contract on the session's server: /docs.json declares what the server does, BentoML's own clients get
curl's answers, text fields read the same either way, /embed and open-vocabulary labels over HTTP."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest
import torch
from _registry_fixture import COLORS, color_image, fusion_sample, png_bytes
from _server_fixture import Server
from bentoml.exceptions import BentoMLException
from PIL import Image

from mmserve.backbone import Backbone
from mmserve.vocab import LABELS_PATTERN, MAX_LABEL_CHARS, MAX_LABELS

CLASSIFY, FUSE = ["colors", "warmth", "brightness"], ["tags", "pet"]


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A red square and a fusion sample's picture, as files (BentoML's client uploads paths)."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(21)
    out = {"red": folder / "red.png", "pet": folder / "pet.png"}
    out["red"].write_bytes(png_bytes(color_image("red", rng)))
    out["pet"].write_bytes(png_bytes(fusion_sample(rng, 1)[0][0]))
    return out


def files(path: Path) -> dict[str, Any]:
    return {"image": (path.name, path.read_bytes(), "image/png")}


def test_docs_json_declares_every_endpoint_parameter_and_status(client: httpx.Client) -> None:
    doc = client.get("/docs.json").json()
    paths = doc["paths"]
    for path in ("/classify", "/fuse", "/embed", "/admin/reload", "/admin/tasks", "/admin/tasks/delete",
                 "/admin/rollback"):
        assert "post" in paths[path], path
    assert paths["/tasks"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/TaskList")
    classify = paths["/classify"]["post"]
    query = {p["name"]: p for p in classify["parameters"]}
    assert set(query) == {"task", "top_k", "labels"} and all(p["in"] == "query" for p in query.values())
    assert query["task"]["schema"]["enum"] == CLASSIFY
    assert (query["top_k"]["schema"]["type"], query["top_k"]["schema"]["minimum"]) == ("integer", 1)
    assert query["top_k"]["schema"]["maximum"] == 1000 and query["labels"]["schema"]["pattern"] == LABELS_PATTERN
    form = classify["requestBody"]["content"]["multipart/form-data"]
    assert set(form["schema"]["properties"]) == {"image", "task", "top_k", "labels"}
    assert form["schema"]["required"] == ["image"] and "image/png" in form["encoding"]["image"]["contentType"]
    fuse = paths["/fuse"]["post"]
    assert fuse["parameters"][0]["schema"]["enum"] == FUSE
    assert fuse["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["task"]["enum"] == FUSE
    for path, statuses in (("/classify", {"200", "400", "404", "413", "415", "422", "500", "503"}),
                           ("/embed", {"200", "400", "404", "413", "415", "422", "500", "503"}),
                           ("/admin/reload", {"200", "400", "401", "403", "413", "415", "422", "500", "503"}),
                           ("/admin/rollback", {"200", "400", "401", "403", "409", "413", "415", "422", "500",
                                                "503"})):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == statuses, path
        for status, answer in responses.items():
            body = answer["content"]["application/json"]
            if status != "200":
                assert body["schema"]["$ref"].endswith("/Error") and body["example"]["error"], (path, status)
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    assert "503" in paths["/readyz"]["get"]["responses"]


def test_task_in_the_query_or_a_form_field(client: httpx.Client, pictures: dict[str, Path]) -> None:
    """The form field wins when both are given; every value given is checked."""
    red = files(pictures["red"])
    by_query = client.post("/classify", params={"task": "colors"}, files=red).json()
    by_form = client.post("/classify", data={"task": "colors"}, files=red).json()
    both = client.post("/classify", params={"task": "warmth"}, data={"task": "colors", "top_k": "1"}, files=red)
    assert by_query == by_form and by_query["label"] == "red"
    assert both.json()["task"] == "colors" and len(both.json()["top_k"]) == 1
    bad_query = client.post("/classify", params={"task": "nope"}, data={"task": "colors"}, files=red)
    assert bad_query.status_code == 404 and "unknown task 'nope'" in bad_query.json()["error"]
    assert client.post("/classify", params={"top_k": "1001"}, data={"task": "colors"}, files=red).status_code == 400
    assert client.post("/classify", params={"top_k": "٣"}, data={"task": "colors"}, files=red).status_code == 400


def test_bentoml_clients_get_curls_answers(server: Server, client: httpx.Client, pictures: dict[str, Path]) -> None:
    red, pet = pictures["red"], pictures["pet"]
    text = "look at this dog"
    curl = {
        "classify": client.post("/classify", params={"task": "colors", "top_k": 2}, files=files(red)).json(),
        "labels": client.post("/classify", params={"labels": "red,green,a dog"}, files=files(red)).json(),
        "fuse": client.post("/fuse", params={"task": "pet"}, data={"text": text}, files=files(pet)).json(),
        "embed": client.post("/embed", data={"text": text, "task": "colors"}, files=files(red)).json(),
    }
    calls = {"classify": ("classify", {"image": red, "task": "colors", "top_k": 2}),
             "labels": ("classify", {"image": red, "labels": "red,green,a dog"}),
             "fuse": ("fuse", {"image": pet, "text": text, "task": "pet"}),
             "embed": ("embed", {"image": red, "text": text, "task": "colors"})}
    with bentoml.SyncHTTPClient(server.url, timeout=60) as sync:
        synced = {name: getattr(sync, api)(**kwargs) for name, (api, kwargs) in calls.items()}
        assert sync.reload() == client.post("/admin/reload").json()  # re-reads the registry served
        with pytest.raises(BentoMLException) as refused:  # a registry directory has no versions to roll back to
            sync.rollback()
        assert refused.value.error_code.value == client.post("/admin/rollback", json={}).status_code == 422

    async def run() -> dict[str, Any]:
        async with bentoml.AsyncHTTPClient(server.url, timeout=60) as asynced:
            return {name: await getattr(asynced, api)(**kwargs) for name, (api, kwargs) in calls.items()}

    for name, want in curl.items():
        assert synced[name] == want, name
    assert asyncio.run(run()) == curl
    assert curl["labels"]["task"] is None and curl["fuse"]["label"] == "dog"
    assert {"image_embedding", "text_embedding"} <= set(curl["embed"])


def test_a_text_field_reads_the_same_from_bentoml_and_curl(server: Server, client: httpx.Client,
                                                          pictures: dict[str, Path]) -> None:
    """BentoML's client sends "a red cat" with its JSON quotes, curl sends it raw: the model sees the same text;
    what is no JSON string literal is read exactly as sent (1.50 stays 1.50)."""
    pet = pictures["pet"]

    def curl(text: str) -> list[float]:
        resp = client.post("/fuse", params={"task": "tags"}, data={"text": text}, files=files(pet))
        assert resp.status_code == 200, resp.text
        return [p["score"] for p in resp.json()["scores"]]

    with bentoml.SyncHTTPClient(server.url, timeout=60) as sync:
        for text in ("a red cat", "1.50", "1e3", "say \"hi\""):
            assert [p["score"] for p in sync.fuse(image=pet, text=text, task="tags")["scores"]] == curl(text), text
    assert curl('"a red cat"') == curl("a red cat")
    assert curl("1.50") != curl("1.5") and curl("1e3") != curl("1000.0")


def test_embed_is_the_backbones_embedding_of_the_upload(client: httpx.Client, tiny_backbone: Backbone) -> None:
    image = color_image("green", np.random.default_rng(8))
    got = client.post("/embed", files={"image": ("g.png", png_bytes(image), "image/png")}, data={"text": "a frog"})
    assert got.status_code == 200, got.text
    body = got.json()
    model = tiny_backbone.model
    with torch.inference_mode():
        pixels = tiny_backbone.preprocess(Image.open(io.BytesIO(png_bytes(image))).convert("RGB"))[None]
        want_image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)[0]
        want_text = torch.nn.functional.normalize(model.encode_text(tiny_backbone.tokenizer(["a frog"])), dim=-1)[0]
    assert body["task"] is None and body["dim"] == len(body["image_embedding"]) == tiny_backbone.embed_dim
    assert (torch.tensor(body["image_embedding"]) - want_image).abs().max() < 1e-5
    assert (torch.tensor(body["text_embedding"]) - want_text).abs().max() < 1e-5
    text_only = client.post("/embed", files={"text": (None, "a frog")}).json()
    assert "image_embedding" not in text_only and text_only["text_embedding"] == body["text_embedding"]
    through = client.post("/embed", params={"task": "colors"}, files={"text": (None, "a frog")}).json()
    assert through["task"] == "colors" and through["text_embedding"] != body["text_embedding"]


@pytest.mark.parametrize(("request_kwargs", "status", "fragment"), [
    ({"files": {"task": (None, "colors")}}, 422, "an image file part, a 'text' field or both"),
    ({"files": {"text": (None, "  ")}}, 422, "must not be empty"),
    ({"params": {"task": "tags"}, "files": {"text": (None, "a cat")}}, 400, "POST /fuse"),
    ({"params": {"task": "nope"}, "files": {"text": (None, "a cat")}}, 404, "unknown task 'nope'"),
    ({"files": {"image": ("a.txt", b"hello", "text/plain")}}, 400, "not an image"),
    ({"json": {"text": "a cat"}}, 415, "multipart/form-data"),
], ids=["nothing to embed", "blank text", "fusion task", "unknown task", "not an image", "JSON body"])
def test_embed_refusals(client: httpx.Client, request_kwargs: dict, status: int, fragment: str) -> None:
    resp = client.post("/embed", **request_kwargs)
    assert resp.status_code == status and fragment in resp.json()["error"], resp.text


def test_open_vocabulary_labels_over_http(client: httpx.Client, pictures: dict[str, Path]) -> None:
    red = files(pictures["red"])
    own = client.post("/classify", params={"task": "colors", "top_k": 3}, files=red).json()
    labels = client.post("/classify", params={"task": "colors", "labels": ",".join(COLORS), "top_k": 3},
                         files=red).json()
    assert labels["task"] == "colors" and labels["label"] == own["label"] == "red"
    assert [p["label"] for p in labels["top_k"]] == [p["label"] for p in own["top_k"]]
    assert np.allclose([p["score"] for p in labels["top_k"]], [p["score"] for p in own["top_k"]], atol=1e-5)
    zero = client.post("/classify", data={"labels": "a cat, a red square ,x"}, files=red).json()
    assert zero["task"] is None and {p["label"] for p in zero["top_k"]} == {"a cat", "a red square", "x"}
    for raw, fragment in ((",".join(["a"] * (MAX_LABELS + 1)), f"at most {MAX_LABELS} labels"),
                          ("a" * (MAX_LABEL_CHARS + 1), f"at most {MAX_LABEL_CHARS}"), ("a,,b", "is empty")):
        resp = client.post("/classify", params={"labels": raw}, files=red)
        assert resp.status_code == 400 and fragment in resp.json()["error"], resp.text
    missing = client.post("/classify", files=red)
    assert missing.status_code == 422 and "'labels'" in missing.json()["error"]


def test_admin_apis_refuse_form_bodies_with_415(client: httpx.Client) -> None:
    for path in ("/admin/reload", "/admin/tasks", "/admin/rollback"):
        resp = client.post(path, content=b"x", headers={"content-type": "multipart/form-data"})
        assert resp.status_code == 415 and "JSON body" in resp.json()["error"], (path, resp.text)
