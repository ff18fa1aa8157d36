"""examples/client.py, run as the README shows it, against the session's server: it prints the answers curl gets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from _server_fixture import Server

ROOT = Path(__file__).resolve().parents[2]
CLIENT = "examples/client.py"
PICTURE = ROOT / "models" / "examples" / "noto.png"  # the client's default picture
TEXT, LABELS = "hammer and wrench", "a hammer,a red heart,a cat"  # and its default text and labels


def ranked(predictions: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p['label']} {p['score']:.3f}" for p in predictions)


def assert_same_lines(got: list[str], want: list[str]) -> None:
    """Equal lines, but printed scores within one unit of their last digit: a request batched with others may
    differ from a lone one in the sixth decimal, which can flip a rounded third."""
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        g_words, w_words = re.split(r"(-?\d+\.\d{3})", g), re.split(r"(-?\d+\.\d{3})", w)
        assert len(g_words) == len(w_words), (g, w)
        for a, b in zip(g_words, w_words, strict=True):
            if re.fullmatch(r"-?\d+\.\d{3}", b):
                assert abs(float(a) - float(b)) <= 1.5e-3, (g, w)
            else:
                assert a == b, (g, w)


def test_example_client_prints_what_curl_gets(server: Server, tmp_path: Path) -> None:
    # from another directory: the default picture is found next to the script, not in the working directory
    done = subprocess.run([sys.executable, str(ROOT / CLIENT), "--url", server.url], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with httpx.Client(base_url=server.url, timeout=60) as http:
        listing = http.get("/tasks").json()
        classify = [t["name"] for t in listing["tasks"] if t["kind"] == "classify"]
        fuse = [t["name"] for t in listing["tasks"] if t["kind"] == "fuse"]

        def post(path: str, **fields: Any) -> dict[str, Any]:
            resp = http.post(path, data=fields, files={"image": ("noto.png", PICTURE.read_bytes(), "image/png")})
            assert resp.status_code == 200, resp.text
            return resp.json()

        own = post("/classify", task=classify[0], top_k=3)
        through = post("/classify", task=classify[0], labels=LABELS, top_k=3)
        zero = post("/classify", labels=LABELS, top_k=3)
        fused = post("/fuse", task=fuse[0], text=TEXT)
        embedded = post("/embed", text=TEXT)
    chosen = [{"label": fused["label"], "score": fused["score"]}] if fused["head"] == "multiclass" else \
        fused["labels"]
    cosine = sum(a * b for a, b in zip(embedded["image_embedding"], embedded["text_embedding"], strict=True))
    assert_same_lines(done.stdout.splitlines(), [
        f"registry {listing['registry_version']}: classify {', '.join(classify)}; fuse {', '.join(fuse)}",
        f"classify {classify[0]}: {ranked(own['top_k'])}",
        f"labels through {classify[0]}: {ranked(through['top_k'])}",
        f"labels zero-shot: {ranked(zero['top_k'])}",
        f"fuse {fuse[0]} {TEXT!r} ({fused['head']}): {ranked(chosen) or '(no label above threshold)'}",
        f"embed: {embedded['dim']} dimensions, |image| 1.000, image . text {cosine:.3f}",
    ])
    assert {p["label"] for p in zero["top_k"]} == set(LABELS.split(",")) and through["task"] == classify[0]
