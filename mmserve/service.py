"""BentoML service: POST /classify, POST /fuse, GET /tasks and POST /admin/reload over one frozen CLIP backbone.

Serve with `bentoml serve mmserve.service:MmServe`. Two BentoML services run as one server:

- `MmServe`, the front users talk to: reads query parameters from the request context, validates and decodes
  each upload on its own (so a bad request gets its own 4xx and never reaches a batch), then calls the engine's
  batchable API with a one-item list. It also counts requests and latency per task for /metrics.
- `MmServeEngine`, internal (reached over a local socket, not exposed on the port): holds the backbone and the
  registry snapshot. Its APIs are `batchable`, so BentoML's adaptive batching coalesces the one-item calls of
  concurrent requests, of ANY tasks, into one list, which the engine answers with one mixed-task forward pass.

This is the pattern BentoML 1.4 documents for batching requests that carry several parameters: a batchable
API takes exactly one list argument, and a wrapper service with `bentoml.depends` turns single requests into
list items. The engine answers every item separately (status + result or error), so one bad item never
fails the rest of its batch.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import bentoml
import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mmserve.config import ServeConfig
from mmserve.engine import ClassifyRequest, FuseRequest, InferenceEngine
from mmserve.errors import RegistryError
from mmserve.images import ImageDecoder, ImageError, preprocess_from_config, split_preprocess
from mmserve.wire import ClassifyItem, FuseItem, pack_pixels, pixels_to_tensor, unpack_pixels

logger = logging.getLogger("mmserve")

CONFIG = ServeConfig.from_env()
NO_TASK = "-"  # metrics label for requests whose task is missing or unknown (keeps label values bounded)
ENGINE_RESOURCES: dict[str, Any] = {"gpu": 1} if CONFIG.device.startswith("cuda") else {"cpu": "2"}
ENGINE_POOL_MAX_REQUESTS = 1_000_000_000  # effectively never by count (see MmServeEngine)
ENGINE_POOL_MAX_AGE_S = 3600.0
ENGINE_ATTEMPTS = 3  # calls to the internal engine service: first try + retries on a dropped connection
MAX_FILE_NAME_BYTES = 200  # BentoML keeps the upload's file name as a temp file suffix; NAME_MAX is 255 bytes
UNKNOWN_TASK_REFRESH_S = 1.0  # a request naming an unknown task asks the engine again at most this often


def dropped_connection(exc: BaseException) -> bool:
    """True for the transient failures of BentoML's pooled client to the engine (a closed keep-alive socket)."""
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return True
    return isinstance(exc, RuntimeError) and "Connection closed" in str(exc)


FORM_TEXTS = "mmserve.form_texts"  # ASGI scope key: the text fields of a checked multipart body, exactly as sent


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a BentoML error carries (e.g. 503 when the batch queue sheds load), else None."""
    return getattr(getattr(exc, "error_code", None), "value", None)


def engine_unavailable(exc: BaseException) -> bool:
    """True when a call to the engine failed because it is unreachable, restarting or shedding load (503)."""
    return dropped_connection(exc) or isinstance(exc, ConnectionError) or http_status(exc) == 503


def _as_text(value: Any) -> Any:
    """BentoML JSON-decodes multipart text fields ('42' -> 42); turn such values back into text.

    Only a fallback for the schema: the round trip is lossy ('1.50' -> '1.5', '"a cat"' -> 'a cat'), so /fuse
    reads the fields as sent from the scope, where UploadGuard leaves them (FORM_TEXTS).
    """
    return value if isinstance(value, str) else json.dumps(value)


Text = Annotated[str, BeforeValidator(_as_text)]


class EngineMetrics:
    """Engine-side Prometheus metrics: how many requests and distinct tasks each forward batch carried."""

    def __init__(self) -> None:
        import prometheus_client as prom  # imported in the worker, after BentoML set up multiprocess mode

        buckets = (1, 2, 4, 8, 16, 32, 64, 128)
        self.batch_size = prom.Histogram("mmserve_engine_batch_size", "Requests per engine batch",
                                         ["endpoint"], buckets=buckets)
        self.batch_tasks = prom.Histogram("mmserve_engine_batch_tasks", "Distinct tasks per engine batch",
                                          ["endpoint"], buckets=buckets)

    def observe(self, endpoint: str, tasks: list[str]) -> None:
        """Record one batch."""
        self.batch_size.labels(endpoint=endpoint).observe(len(tasks))
        self.batch_tasks.labels(endpoint=endpoint).observe(len(set(tasks)))


# no access log here: every engine call is one front request, which the front's access log already records.
# runner_connection: BentoML's client to this service replaces its whole connection pool every `max_requests`
# calls (default 100) and closes the old pool with calls still in flight on it, which fail with "server
# disconnected" (about 1 request in 5 at concurrency 32); the calls stay on one pool, renewed by age only
@bentoml.service(name="mmserve-engine", workers=1, threads=1, resources=ENGINE_RESOURCES, traffic={"timeout": 120},
                 logging={"access": {"enabled": False}},
                 runner_connection={"max_requests": ENGINE_POOL_MAX_REQUESTS, "max_age": ENGINE_POOL_MAX_AGE_S})
class MmServeEngine:
    """Internal service: the backbone, the registry snapshot and the batchable inference APIs."""

    def __init__(self) -> None:
        self.engine = InferenceEngine.from_config(CONFIG)
        self.metrics = EngineMetrics()
        split = split_preprocess(preprocess_from_config(self.engine.describe()["preprocess"]))
        self.finish = split[1] if split else None  # ToTensor + Normalize of uint8 pixels from the front
        logger.info("engine ready: registry %s version %s, runtime %s, device %s", CONFIG.registry,
                    self.engine.snapshot.version, self.engine.runtime.name, CONFIG.device)

    def _tensor(self, data: str, kind: str, size: int) -> torch.Tensor | np.ndarray:
        return pixels_to_tensor(unpack_pixels(data, size, kind), self.finish)

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def classify_batch(self, items: list[ClassifyItem]) -> list[dict[str, Any]]:
        """Classify a batch of independent requests (any mix of tasks) in one forward pass."""
        self.metrics.observe("classify", [it.task for it in items])
        size = self.engine.image_size
        requests = [ClassifyRequest(self._tensor(it.image, it.pixels, size), it.task, it.top_k) for it in items]
        return [o.to_dict() for o in self.engine.classify_requests(requests)]

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def fuse_batch(self, items: list[FuseItem]) -> list[dict[str, Any]]:
        """Fuse a batch of independent image+text requests, one pass per fusion task present."""
        self.metrics.observe("fuse", [it.task for it in items])
        size = self.engine.image_size
        requests = [FuseRequest(self._tensor(it.image, it.pixels, size), it.text, it.task) for it in items]
        return [o.to_dict() for o in self.engine.fuse_requests(requests)]

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Served registry version, tasks, preprocessing, runtime and backbone."""
        return self.engine.describe()

    @bentoml.api
    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Build and swap in a registry version (default: re-read the current path); refused if invalid."""
        try:
            result = await asyncio.to_thread(self.engine.reload, path)
        except RegistryError as exc:
            return {"ok": False, "error": str(exc), "serving_version": self.engine.snapshot.version}
        logger.info("registry reloaded: %s -> %s (%s)", result.previous_version, result.version, result.root)
        return {"ok": True, **result.to_dict()}


def is_loopback(host: str | None) -> bool:
    """True for a caller on this machine (127.0.0.0/8, ::1)."""
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_authorized(authorization: str | None, token: str | None, client_host: str | None) -> bool:
    """With an admin token: the header is exactly `Bearer <token>` (constant-time). Without one: loopback callers
    only, so a server whose port is published does not let anyone on the network swap its registry."""
    if token is None:
        return is_loopback(client_host)
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())


@dataclass(frozen=True)
class EngineView:
    """The front's copy of what the engine serves: registry version and task kinds, for request validation."""

    version: str
    kinds: Mapping[str, str]
    data: Mapping[str, Any]

    def names(self, kind: str) -> list[str]:
        """Task names of one kind."""
        return [name for name, k in self.kinds.items() if k == kind]


@dataclass
class Reply:
    """An HTTP answer: status, JSON body and the task label for metrics."""

    status: int
    body: dict[str, Any]
    task: str = NO_TASK

    @classmethod
    def error(cls, status: int, message: str, task: str = NO_TASK, **details: Any) -> Reply:
        """A 4xx/5xx with a JSON message."""
        return cls(status, {"error": message, **details}, task)


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


async def _tasks_endpoint(request: Request) -> JSONResponse:
    """GET /tasks: every task's name, kind, group, classes and metrics, and the registry version served."""
    service = bentoml.get_current_service()
    try:
        view = await service.engine_view(refresh=True)
    except Exception:
        logger.exception("GET /tasks: engine unavailable")
        return JSONResponse({"error": "inference engine unavailable, retry"}, status_code=503)
    data = view.data
    return JSONResponse({"registry_version": data["registry_version"], "registry_loaded_at":
                         data["registry_loaded_at"], "runtime": data["runtime"], "backbone": data["backbone"],
                         "tasks": data["tasks"]})


# mounted at "/": BentoML's PassiveMount only claims paths a route of this app matches, so GET /tasks works
# without a trailing-slash redirect and nothing else is shadowed
tasks_app = Starlette(routes=[Route("/tasks", _tasks_endpoint, methods=["GET"])])


@bentoml.service(name="mmserve", traffic={"timeout": 120})
@bentoml.asgi_app(tasks_app, path="/")
class MmServe:
    """mmserve: classify images with any trained task, fuse image + text, list tasks, reload the registry."""

    engine = bentoml.depends(MmServeEngine)
    _unknown_until = 0.0  # monotonic time before which an unknown task name does not make view_for ask again

    def __init__(self) -> None:
        torch.set_num_threads(1)  # this process only decodes and resizes uploads; the engine owns the cores
        self.metrics = ServiceMetrics()
        self._view: EngineView | None = None
        self._stale = True
        self._lock = asyncio.Lock()
        self._decoder: ImageDecoder | None = None

    # ---- engine access -------------------------------------------------------------------------------------

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        client = getattr(self.engine, "to_async", None)  # served: a remote proxy; in-process: a local instance
        if client is None:
            return await asyncio.to_thread(getattr(self.engine, name), *args, **kwargs)
        # BentoML's internal client can fail a call with "server disconnected": a pooled connection the engine's
        # server already closed (bentoml/BentoML#4971), or the pool renewed (by age, see MmServeEngine) under calls
        # in flight; every engine API is idempotent, so retrying on a fresh connection is safe
        for attempt in range(ENGINE_ATTEMPTS):
            try:
                return await getattr(client, name)(*args, **kwargs)
            except Exception as exc:
                if not dropped_connection(exc) or attempt == ENGINE_ATTEMPTS - 1:
                    raise
                logger.warning("engine connection dropped during %s (%s); retrying", name, exc.__class__.__name__)

    async def _refresh(self) -> EngineView:
        """Ask the engine what it serves (caller holds the lock)."""
        data = await self._call("describe")
        self._view = EngineView(data["registry_version"], {t["name"]: t["kind"] for t in data["tasks"]}, data)
        self._stale = False
        if self._decoder is None:
            self._decoder = ImageDecoder(preprocess_from_config(data["preprocess"]), CONFIG.max_image_pixels)
        return self._view

    async def engine_view(self, refresh: bool = False) -> EngineView:
        """What the engine serves now (cached; refreshed after reloads and when an answer shows a new version)."""
        async with self._lock:
            if refresh or self._stale or self._view is None:
                return await self._refresh()
            return self._view

    async def view_for(self, task: str | None) -> EngineView:
        """The engine view, asked again when it lacks `task` (another front worker may have reloaded); after an
        answer that still lacked a requested task, not again for UNKNOWN_TASK_REFRESH_S (junk names are cheap)."""
        view = await self.engine_view()
        if not task or task in view.kinds:
            return view
        async with self._lock:
            view = self._view
            assert view is not None
            if task not in view.kinds and time.monotonic() >= self._unknown_until:
                view = await self._refresh()
                if task not in view.kinds:
                    self._unknown_until = time.monotonic() + UNKNOWN_TASK_REFRESH_S
            return view

    def task_label(self, name: str | None) -> str:
        """Metrics label for a task name: the name when the registry has it, else '-'."""
        view = self._view
        return name if view is not None and name in view.kinds else NO_TASK

    async def _decode(self, image: Path) -> tuple[str, str]:
        """Upload file -> (pixels packed for the engine, their kind: uint8 before ToTensor, or float32)."""
        decoder = self._decoder
        assert decoder is not None

        def work() -> tuple[str, str]:
            pixels = decoder.pixels(image.read_bytes())
            return pack_pixels(pixels), "uint8" if pixels.dtype == np.uint8 else "float32"

        return await asyncio.to_thread(work)

    async def _infer(self, api: str, item: BaseModel, task: str, view: EngineView) -> Reply:
        try:
            outcome = (await self._call(api, [item]))[0]
        except Exception as exc:  # engine overloaded (503 from BentoML's batch deadline), restarting or failing
            if dropped_connection(exc):
                logger.warning("engine connection failed %d times during %s", ENGINE_ATTEMPTS, api)
                return Reply.error(503, "inference engine connection failed; retry", task)
            if http_status(exc) == 503:
                return Reply.error(503, "server overloaded: the batch queue is past MMSERVE_MAX_LATENCY_MS; retry",
                                   task)
            logger.exception("engine call %s failed", api)
            return Reply.error(500, "inference failed; see the server log", task)
        if outcome["status"] != 200:
            return Reply.error(outcome["status"], outcome["error"], task, **outcome["details"])
        if outcome["result"]["registry_version"] != view.version:
            self._stale = True  # reloaded behind our back (another front worker): refresh on the next request
        return Reply(200, outcome["result"], task)

    # ---- endpoints ------------------------------------------------------------------------------------------

    async def _classify(self, image: Path, params: Mapping[str, str]) -> Reply:
        task = params.get("task")
        view = await self.view_for(task)
        known = view.names("classify")
        if not task:
            return Reply.error(422, "query parameter 'task' is required: POST /classify?task=NAME",
                               known_tasks=known)
        if task not in view.kinds:
            return Reply.error(404, f"unknown task '{task}'; known classify tasks: {', '.join(known) or '(none)'}",
                               known_tasks=known)
        if view.kinds[task] != "classify":
            return Reply.error(400, f"task '{task}' is a fusion task: send it to POST /fuse with an image and a "
                                    f"text", task, known_tasks=known)
        raw_k = params.get("top_k", "5")
        try:
            top_k = int(raw_k)
            if top_k < 1:
                raise ValueError
        except ValueError:
            return Reply.error(400, f"top_k must be a positive integer, got {raw_k!r}", task)
        try:
            pixels, kind = await self._decode(image)
        except ImageError as exc:
            return Reply.error(400, str(exc), task)
        item = ClassifyItem(image=pixels, task=task, top_k=top_k, pixels=kind)
        return await self._infer("classify_batch", item, task, view)

    async def _fuse(self, image: Path, text: str, task: str | None) -> Reply:
        view = await self.view_for(task)
        known = view.names("fuse")
        if not task:
            if len(known) != 1:
                return Reply.error(422, f"several fusion tasks are served: pass 'task' (form field or query "
                                        f"parameter), one of {', '.join(known)}" if known else
                                   "the registry has no fusion task", known_tasks=known)
            task = known[0]
        if task not in view.kinds:
            return Reply.error(404, f"unknown task '{task}'; known fusion tasks: {', '.join(known) or '(none)'}",
                               known_tasks=known)
        if view.kinds[task] != "fuse":
            return Reply.error(400, f"task '{task}' is a classification task: send it to POST /classify?task="
                                    f"{task}", task, known_tasks=known)
        if not text.strip():
            return Reply.error(422, "field 'text' must not be empty", task)
        try:
            pixels, kind = await self._decode(image)
        except ImageError as exc:
            return Reply.error(400, str(exc), task)
        return await self._infer("fuse_batch", FuseItem(image=pixels, text=text, task=task, pixels=kind), task, view)

    async def _answer(self, endpoint: str, ctx: bentoml.Context, started: float, work: Any) -> dict[str, Any]:
        try:
            reply = await work
        except Exception as exc:  # a bug, or the engine starting or unreachable: never a stack trace to the client
            logger.exception("%s failed", endpoint)
            if self._view is None or engine_unavailable(exc):
                reply = Reply.error(503, "inference engine unavailable; retry")
            else:
                reply = Reply.error(500, "internal error; see the server log")
        ctx.response.status_code = reply.status
        self.metrics.record(endpoint, reply.task, reply.status, time.perf_counter() - started)
        return reply.body

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, ctx: bentoml.Context) -> dict[str, Any]:
        """Classify an uploaded image: POST /classify?task=NAME&top_k=5 with a multipart 'image' file."""
        return await self._answer("/classify", ctx, time.perf_counter(),
                                  self._classify(image, ctx.request.query_params))

    @bentoml.api(route="/fuse")
    async def fuse(self, image: Path, text: Text, ctx: bentoml.Context, task: Text | None = None) -> dict[str, Any]:
        """Fuse an uploaded image with a text: multipart 'image' + 'text' (+ 'task' when several fusion tasks)."""
        sent = ctx.request.scope.get(FORM_TEXTS, {})  # the fields as sent, before BentoML's JSON decoding
        text, task = sent.get("text", text), sent.get("task", task)
        return await self._answer("/fuse", ctx, time.perf_counter(),
                                  self._fuse(image, text, task or ctx.request.query_params.get("task")))

    @bentoml.api(route="/admin/reload")
    async def reload(self, ctx: bentoml.Context, path: str | None = None) -> dict[str, Any]:
        """Load a new registry version without restart: JSON {"path": DIR} or no body to re-read the current one."""
        client = ctx.request.client
        if not admin_authorized(ctx.request.headers.get("authorization"), CONFIG.admin_token,
                                client.host if client else None):
            if CONFIG.admin_token is None:
                ctx.response.status_code = 403
                return {"error": "without MMSERVE_ADMIN_TOKEN only callers on the server's own machine may reload; "
                                 "set the token to reload from elsewhere"}
            ctx.response.status_code = 401
            return {"error": "admin token required: Authorization: Bearer $MMSERVE_ADMIN_TOKEN"}
        try:
            result = await self._call("reload", path=path)
        except Exception as exc:  # the engine unreachable or restarting, or a bug: a clear status, never a trace
            unavailable = engine_unavailable(exc)
            logger.exception("registry reload of %s failed", path)
            ctx.response.status_code = 503 if unavailable else 500
            return {"error": "inference engine unavailable; retry" if unavailable else
                    "reload failed; see the server log"}
        await self.engine_view(refresh=True)
        if not result.pop("ok"):
            ctx.response.status_code = 422
            return {"error": f"registry refused, still serving {result['serving_version']}: {result['error']}",
                    "serving_version": result["serving_version"]}
        return result


@dataclass(frozen=True)
class FormSpec:
    """Multipart fields an upload endpoint requires: file parts and text parts."""

    files: tuple[str, ...] = ("image",)
    texts: tuple[str, ...] = ()
    optional_texts: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        """Every field the endpoint takes, in order."""
        return (*self.files, *self.texts, *self.optional_texts)


def file_name_bytes(filename: str) -> bytes:
    """The bytes of an upload's file name that BentoML puts into its temp file name (the basename)."""
    return os.path.basename(filename).encode("utf-8", "surrogatepass")


@dataclass
class UploadGuard:
    """ASGI middleware before the APIs: body size limit (413) and multipart shape checks (400/415/422)."""

    # BentoML parses uploads before an API function runs, and some malformed bodies (no multipart boundary, a
    # text field where the image file belongs, ...) make that parser fail with a 500. The guard reads the body
    # once (refusing it past the limit), checks that it parses and has the right fields, then replays it.

    app: Any
    max_bytes: int
    forms: Mapping[str, FormSpec] = field(default_factory=dict)

    async def _reject(self, scope: Any, receive: Any, send: Any, status: int, message: str, started: float
                      ) -> None:
        service = bentoml.get_current_service()
        if isinstance(service, MmServe.inner) and scope["path"] in self.forms:
            params = Request(scope).query_params
            service.metrics.record(scope["path"], service.task_label(params.get("task")), status,
                                   time.perf_counter() - started)
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)

    async def _check_form(self, scope: Any, body: bytes, spec: FormSpec) -> tuple[int, str] | None:
        """None when the body is a multipart form with the fields of `spec` (its text fields, as sent, are left
        in scope[FORM_TEXTS]); else the status and message to refuse it with."""
        content_type = Headers(scope=scope).get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return 415, ("send multipart/form-data with the image as a file part, e.g. curl -F image=@photo.jpg; "
                         f"got content-type {content_type or '(none)'!r}")
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, receive).form(max_files=len(spec.files) + 4, max_fields=16)
        except Exception as exc:  # MultiPartException, bad boundary, undecodable headers...
            return 400, f"malformed multipart body: {getattr(exc, 'detail', None) or exc}"
        texts: dict[str, str] = {}
        try:
            for name in spec.files:
                value = form.get(name)
                if value is None:
                    return 422, f"multipart field '{name}' (an image file) is required"
                if not isinstance(value, UploadFile):
                    return 400, f"multipart field '{name}' must be a file part (curl -F {name}=@photo.jpg)"
                if value.filename is not None and len(file_name_bytes(value.filename)) > MAX_FILE_NAME_BYTES:
                    return 400, (f"file name of '{name}' is too long: over {MAX_FILE_NAME_BYTES} bytes in UTF-8 "
                                 f"(it becomes part of a temp file name)")
            for name in (*spec.texts, *spec.optional_texts):
                value = form.get(name)
                if value is None:
                    if name in spec.texts:
                        return 422, f"multipart field '{name}' is required"
                    continue
                if isinstance(value, UploadFile):
                    return 400, f"multipart field '{name}' must be a text field, not a file"
                try:
                    json.loads(value)  # BentoML JSON-decodes text fields; pathological nesting would crash it
                except ValueError:
                    pass
                except RecursionError:
                    return 400, f"multipart field '{name}' is nested too deeply"
                texts[name] = value
            unexpected = next((name for name in form if name not in spec.fields), None)
            if unexpected is not None:  # BentoML's parser crashes on some extra parts (undecodable files, ...)
                return 400, (f"unexpected multipart field {unexpected[:100]!r}; {scope['path']} takes: "
                             f"{', '.join(spec.fields)}")
        finally:
            await form.close()
        scope[FORM_TEXTS] = texts
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass everything but POST bodies straight through; check, buffer and replay POST bodies."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        length = Headers(scope=scope).get("content-length")
        too_big = f"request body is over the limit of {self.max_bytes} bytes (MMSERVE_MAX_BODY_BYTES)"
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send, 413, f"{too_big}: {length} bytes", started)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send, 413, too_big, started)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        spec = self.forms.get(scope["path"])
        if spec is not None:
            problem = await self._check_form(scope, body, spec)
            if problem is not None:
                return await self._reject(scope, receive, send, *problem, started)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


MmServe.add_asgi_middleware(UploadGuard, max_bytes=CONFIG.max_body_bytes, forms={
    "/classify": FormSpec(),
    "/fuse": FormSpec(texts=("text",), optional_texts=("task",)),
})
