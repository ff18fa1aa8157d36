"""The web floor: a BentoML service that takes the same upload as POST /classify and runs no model.

`mmserve bench` serves it beside the real server and loads it the same way, so the CPU one request costs in
BentoML's own stack (HTTP parsing, multipart upload to a temp file, middlewares, JSON response) is measured on the
machine of each run. With the in-process decode cost and the forward pass, that bounds HTTP/engine for ANY server
built on BentoML there: see `report.cpu_budget`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml

WEB_FLOOR_NAME = "mmserve-web-floor"


# the access log stays on, as in the real front: it is part of what every served request costs
@bentoml.service(name=WEB_FLOOR_NAME, workers=1)
class WebFloor:
    """POST /classify?task=NAME with a multipart image: reads the upload and answers its size, nothing else."""

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, ctx: bentoml.Context) -> dict[str, Any]:
        """The upload's byte count and the task asked for: the least a classify endpoint can do."""
        return {"task": ctx.request.query_params.get("task"), "bytes": len(image.read_bytes())}
