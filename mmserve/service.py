"""BentoML entry point: POST /classify, POST /fuse, GET /tasks and POST /admin/reload over one frozen CLIP backbone.

Serve with `bentoml serve mmserve.service:MmServe` (bentofile.yaml names the same). Two BentoML services run as
one server, both in mmserve/serving/:

- `MmServe` (front.py), the front users talk to: validates and decodes each upload on its own, then calls the
  engine's batchable API with a one-item list; counts requests and latency per task for /metrics.
- `MmServeEngine` (engine_service.py), internal: holds the backbone and the registry snapshot; BentoML's adaptive
  batching coalesces concurrent one-item calls, of ANY tasks, into one mixed-task forward pass, and every item
  is answered separately (a result or its own error), so one bad item never fails the rest of its batch.

The rest of the package: uploads.py (the upload guard middleware), auth.py (who may reload), metrics.py,
client.py (the front's calls to the engine) and statuses.py (the one map from errors to HTTP statuses).
"""

from __future__ import annotations

from mmserve.serving.auth import admin_authorized, is_loopback
from mmserve.serving.client import dropped_connection, engine_unavailable
from mmserve.serving.engine_service import MmServeEngine
from mmserve.serving.front import MmServe

__all__ = ["MmServe", "MmServeEngine", "admin_authorized", "dropped_connection", "engine_unavailable", "is_loopback"]
