"""Input limits outside the HTTP suite: image shapes and bit depths, `mmserve bench` counts, the front's task cache."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _registry_fixture import png_bytes
from PIL import Image

from mmserve.backbone import TINY_MODEL
from mmserve.cli import main
from mmserve.images import MAX_ASPECT, ImageError, decode_image

PIXEL_LIMIT = 10_000_000


@pytest.mark.parametrize("size", [(1, 400_000), (400_000, 1), (3, 301)])
def test_extreme_aspect_ratios_are_refused_before_resizing(size: tuple[int, int]) -> None:
    data = png_bytes(Image.new("L", size))  # a few kB, under the pixel limit, but gigabytes once resized
    width, height = size
    with pytest.raises(ImageError, match=rf"image is {width}x{height} px: aspect ratio over {MAX_ASPECT}:1"):
        decode_image(data, PIXEL_LIMIT)


def test_aspect_ratios_up_to_the_limit_decode() -> None:
    for size in ((1, MAX_ASPECT), (3 * MAX_ASPECT, 3), (40, 30)):
        assert decode_image(png_bytes(Image.new("L", size)), PIXEL_LIMIT).size == size


def _grey16(value: int) -> int:
    img = Image.fromarray(np.full((8, 8), value, dtype=np.uint16))
    assert img.mode == "I;16"
    out = decode_image(png_bytes(img), PIXEL_LIMIT)
    assert out.mode == "RGB"
    return out.getpixel((0, 0))[0]


def test_16_bit_greyscale_is_scaled_by_its_full_range_not_its_peak() -> None:
    v255, v256, v65535 = _grey16(255), _grey16(256), _grey16(65535)
    assert v255 <= v256 < v65535 == 255
    assert v255 <= 2 and v256 <= 2  # 255/65535 and 256/65535 of full scale: both nearly black


@pytest.mark.parametrize("flag", ["--rounds", "--http-runs", "--http-requests"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_bench_counts_must_be_positive(flag: str, value: str, capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:  # (were it accepted: a quick tiny run, its report in tmp_path)
        main(["bench", flag, value, "--model", TINY_MODEL, "--pretrained", "none", "--batch-sizes", "1", "--iters",
              "1", "--warmup", "0", "--tasks", "1", "--variants", "", "--no-http", "--out", str(tmp_path / "b.json")])
    assert info.value.code == 2
    assert f"argument {flag}: must be >= 1, got {value}" in capsys.readouterr().err


def test_unknown_task_names_ask_the_engine_at_most_once_per_interval(tiny_backbone,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Junk task names must not make every request wait on an engine describe under the front's lock."""
    from mmserve.images import preprocess_config
    from mmserve.serving import front as service

    monkeypatch.setattr(service, "UNKNOWN_TASK_REFRESH_S", 0.2)
    answers = {"names": ["colors"]}
    calls: list[str] = []

    async def fake_call(name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(name)
        return {"registry_version": f"v{len(calls)}",
                "tasks": [{"name": n, "kind": "classify"} for n in answers["names"]],
                "preprocess": preprocess_config(tiny_backbone)}

    front = service.MmServe.inner.__new__(service.MmServe.inner)  # no __init__: it sets this process's threads
    front._view, front._stale, front._decoder = None, True, None
    front._call = fake_call

    async def scenario() -> None:
        front._lock = asyncio.Lock()
        for name in ("nope", "nope", "other-junk", "nope"):
            assert "nope" not in (await front.view_for(name)).kinds
        assert calls == ["describe"] * 2  # the first look, then one refresh for the unknown name
        answers["names"] = ["colors", "added"]
        assert "added" not in (await front.view_for("added")).kinds  # within the interval: the cached view
        await asyncio.sleep(0.25)
        assert "added" in (await front.view_for("added")).kinds  # after it: asked again, and found
        assert calls == ["describe"] * 3
        assert "added" in (await front.view_for("added")).kinds and len(calls) == 3  # known now: no call

    asyncio.run(scenario())
