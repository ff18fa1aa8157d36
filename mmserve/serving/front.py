"""MmServe: the front users talk to (POST /classify, /fuse, /embed, GET /tasks, the admin APIs, GET /docs.json).

The front reads `task`, `top_k` and `labels` from a form field or the query (both are declared, so BentoML's own
client, which sends only declared arguments, and curl's `?task=` both work), validates and decodes each upload on
its own (so a bad request gets its own 4xx and never reaches a batch), then calls the engine's batchable API with
a one-item list. This is the pattern BentoML 1.4 documents for batching requests that carry several parameters:
a batchable API takes exactly one list argument, and a wrapper service with `bentoml.depends` turns single
requests into list items. The front checks task names with the engine's own check (mmserve.errors.require_task)
on its cached copy of what the engine serves, and answers every refusal through one table
(mmserve.serving.statuses). It also counts requests and latency per task for /metrics; GET /docs.json is the
contract (mmserve.serving.contract).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mmserve.answers import Outcome
from mmserve.errors import InvalidInputError, MissingInputError, MissingTaskError, require_task
from mmserve.images import ImageDecoder, preprocess_from_config
from mmserve.serving.auth import admin_authorized
from mmserve.serving.client import ENGINE_ATTEMPTS, call_engine, dropped_connection, engine_unavailable, http_status
from mmserve.serving.contract import document
from mmserve.serving.engine_service import MmServeEngine
from mmserve.serving.metrics import NO_TASK, ServiceMetrics
from mmserve.serving.settings import CONFIG
from mmserve.serving.statuses import REFUSALS, error_body, status_for
from mmserve.serving.uploads import FORM_TEXTS, FormSpec, UploadGuard
from mmserve.vocab import parse_labels
from mmserve.wire import ClassifyItem, EmbedItem, FuseItem, LabelsItem, pack_pixels

logger = logging.getLogger("mmserve")

UNKNOWN_TASK_REFRESH_S = 1.0  # a request naming an unknown task asks the engine again at most this often
KIND_ROUTES = {"classify": "/classify", "fuse": "/fuse"}  # the endpoint each task kind is sent to
MAX_TOP_K = 1000  # top_k past this is refused (400); below it, top_k past the number of classes gives them all


def _as_text(value: Any) -> Any:
    """BentoML JSON-decodes multipart text fields ('42' -> 42); turn such values back into text.

    Only for BentoML's own validation of the declared arguments: the round trip is lossy ('1.50' -> '1.5'), so
    the endpoints read every field as sent from the scope, where UploadGuard leaves them (FORM_TEXTS), through
    form_text.
    """
    return value if isinstance(value, str) else json.dumps(value)


def form_text(raw: str) -> str:
    """A multipart text field as its sender meant it: BentoML's client JSON-encodes every field ("a cat", quotes
    included) and curl sends it raw, so a field that is one JSON string literal is decoded and anything else is
    kept exactly as sent (1.50 stays 1.50, 1e3 stays 1e3)."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            value = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(value, str):
            return value
    return raw


def sent_values(ctx: bentoml.Context, name: str) -> list[str]:
    """Every value of parameter `name` as sent: the form field's (form_text) first, then the query's."""
    fields = ctx.request.scope.get(FORM_TEXTS, {})
    values = [form_text(fields[name])] if name in fields else []
    return values + ctx.request.query_params.getlist(name)


Text = Annotated[str, BeforeValidator(_as_text)]


@dataclass(frozen=True)
class EngineView:
    """The front's copy of what the engine serves: registry version and task kinds, for request validation."""

    version: str
    kinds: Mapping[str, str]
    data: Mapping[str, Any]

    def names(self, kind: str) -> list[str]:
        """Task names of one kind."""
        return [name for name, k in self.kinds.items() if k == kind]

    def require(self, name: str, kind: str) -> None:
        """Raise UnknownTaskError / WrongTaskKindError unless task `name` is of `kind` (the engine's own check)."""
        require_task(self.kinds, name, kind)

    def label(self, name: str | None) -> str:
        """Metrics label for a task name: the name when this view has it, else '-'."""
        return name if name in self.kinds else NO_TASK


@dataclass
class Reply:
    """An HTTP answer: status, JSON body and the task label for metrics."""

    status: int
    body: dict[str, Any]
    task: str = NO_TASK

    @classmethod
    def error(cls, status: int, message: str, task: str = NO_TASK) -> Reply:
        """A 5xx with a JSON message."""
        return cls(status, {"error": message}, task)

    @classmethod
    def refusal(cls, exc: Exception, task: str = NO_TASK) -> Reply:
        """A request refused with a RequestError or ImageError: its status from the one table, its message."""
        return cls(status_for(exc), error_body(exc), task)


def task_listing(task: Mapping[str, Any]) -> dict[str, Any]:
    """A task as GET /tasks lists it: the engine's description plus the endpoint its kind is sent to."""
    return {"name": task["name"], "kind": task["kind"], "endpoint": KIND_ROUTES[task["kind"]], **task}


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
                         "tasks": [task_listing(t) for t in data["tasks"]]})


async def _docs_endpoint(request: Request) -> JSONResponse:
    """GET /docs.json: the contract (mmserve.serving.contract), `task` listing the tasks served now."""
    service = bentoml.get_current_service()
    try:
        data = (await service.engine_view()).data
        tasks: dict[str, list[str]] | None = {kind: [t["name"] for t in data["tasks"] if t["kind"] == kind]
                                              for kind in KIND_ROUTES}
    except Exception:  # the engine starting or unreachable: the document without the task names
        logger.warning("GET /docs.json: engine unavailable, task names left out")
        tasks = None
    return JSONResponse(document(MmServe.openapi_spec.asdict(), tasks))


# mounted at "/": BentoML's PassiveMount only claims paths a route of this app matches, so GET /tasks works
# without a trailing-slash redirect and nothing else is shadowed; it comes before BentoML's own /docs.json route
tasks_app = Starlette(routes=[Route("/tasks", _tasks_endpoint, methods=["GET"]),
                              Route("/docs.json", _docs_endpoint, methods=["GET"])])


def positive_int(name: str, raw: str, most: int = MAX_TOP_K) -> int:
    """A parameter that must be an integer in [1, most], in ASCII digits; InvalidInputError otherwise."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(most)) and 1 <= int(raw) <= most):
        raise InvalidInputError(f"{name} must be an integer from 1 to {most}, got {raw[:100]!r}")
    return int(raw)


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
        return await call_engine(self.engine, name, *args, **kwargs)

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
        return NO_TASK if view is None else view.label(name)

    async def _decode(self, image: Path) -> tuple[str, str]:
        """Upload file -> (pixels packed for the engine, their kind: uint8 before ToTensor, or float32)."""
        decoder = self._decoder
        assert decoder is not None

        def work() -> tuple[str, str]:
            pixels = decoder.pixels(image.read_bytes())
            return pack_pixels(pixels), "uint8" if pixels.dtype == np.uint8 else "float32"

        return await asyncio.to_thread(work)

    async def _infer(self, api: str, item: BaseModel, task: str, view: EngineView) -> Reply:
        """The engine's answer to one item; raises the item's RequestError when the engine refused it."""
        try:
            outcome = Outcome.from_dict((await self._call(api, [item]))[0])
        except Exception as exc:  # engine overloaded (503 from BentoML's batch deadline), restarting or failing
            if dropped_connection(exc):
                logger.warning("engine connection failed %d times during %s", ENGINE_ATTEMPTS, api)
                return Reply.error(503, "inference engine connection failed; retry", task)
            if http_status(exc) == 503:
                return Reply.error(503, "server overloaded: the batch queue is past MMSERVE_MAX_LATENCY_MS; retry",
                                   task)
            logger.exception("engine call %s failed", api)
            return Reply.error(500, "inference failed; see the server log", task)
        error = outcome.exception()
        if error is not None:
            raise error
        if outcome.result["registry_version"] != view.version:
            self._stale = True  # reloaded behind our back (another front worker): refresh on the next request
        return Reply(200, outcome.result, task)

    # ---- endpoints ------------------------------------------------------------------------------------------

    @staticmethod
    def _task(view: EngineView, values: list[str], kind: str) -> str | None:
        """The task a request names (the form field's before the query's), each value given checked: an unknown
        task 404, one of the other kind 400, an empty name 422; None when none is given."""
        for value in values:
            if not value:
                raise MissingTaskError(f"'task' is empty; known {kind} tasks: {', '.join(view.names(kind))}",
                                       known_tasks=view.names(kind))
            view.require(value, kind)
        return values[0] if values else None

    async def _classify(self, image: Path, ctx: bentoml.Context) -> Reply:
        tasks = sent_values(ctx, "task")
        view = await self.view_for(next((t for t in tasks if t), None))
        task = tasks[0] if tasks else None
        try:
            task = self._task(view, tasks, "classify")
            top_k = [positive_int("top_k", raw) for raw in sent_values(ctx, "top_k")]
            labels = [parse_labels(raw) for raw in sent_values(ctx, "labels")]
            if task is None and not labels:
                raise MissingTaskError("'task' is required (query parameter or form field: POST /classify?task=NAME),"
                                       " or 'labels' to rank your own labels zero-shot",
                                       known_tasks=view.names("classify"))
            pixels, kind = await self._decode(image)
            k = top_k[0] if top_k else 5
            if labels:
                item: BaseModel = LabelsItem(image=pixels, labels=labels[0], task=task, top_k=k, pixels=kind)
                return await self._infer("labels_batch", item, view.label(task), view)
            assert task is not None
            item = ClassifyItem(image=pixels, task=task, top_k=k, pixels=kind)
            return await self._infer("classify_batch", item, task, view)
        except REFUSALS as exc:
            return Reply.refusal(exc, view.label(task))

    async def _fuse(self, image: Path, ctx: bentoml.Context) -> Reply:
        tasks = sent_values(ctx, "task")
        view = await self.view_for(next((t for t in tasks if t), None))
        task = tasks[0] if tasks else None
        try:
            task = self._task(view, tasks, "fuse")
            if task is None:
                known = view.names("fuse")
                if len(known) != 1:
                    raise MissingTaskError(f"several fusion tasks are served: pass 'task' (form field or query "
                                           f"parameter), one of {', '.join(known)}" if known else
                                           "the registry has no fusion task", known_tasks=known)
                task = known[0]
            text = next(iter(sent_values(ctx, "text")), None)
            if text is None:
                raise MissingInputError("multipart field 'text' is required")
            if not text.strip():
                raise MissingInputError("field 'text' must not be empty")
            pixels, kind = await self._decode(image)
            item = FuseItem(image=pixels, text=text, task=task, pixels=kind)
            return await self._infer("fuse_batch", item, task, view)
        except REFUSALS as exc:
            return Reply.refusal(exc, view.label(task))

    async def _embed(self, image: Path | None, ctx: bentoml.Context) -> Reply:
        tasks = sent_values(ctx, "task")
        view = await self.view_for(next((t for t in tasks if t), None))
        task = tasks[0] if tasks else None
        try:
            task = self._task(view, tasks, "classify")
            text = next(iter(sent_values(ctx, "text")), None)
            if image is None and text is None:
                raise MissingInputError("send an image file part, a 'text' field or both")
            if text is not None and not text.strip():
                raise MissingInputError("field 'text' must not be empty")
            pixels, kind = await self._decode(image) if image is not None else (None, "float32")
            item = EmbedItem(image=pixels, text=text, task=task, pixels=kind)
            return await self._infer("embed_batch", item, view.label(task), view)
        except REFUSALS as exc:
            return Reply.refusal(exc, view.label(task))

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
    async def classify(self, image: Path, ctx: bentoml.Context, task: Text | None = None, top_k: Text | None = None,
                       labels: Text | None = None) -> dict[str, Any]:
        """Classify an uploaded image with a task's classes (task=NAME), or rank your own labels (labels=a,b,c)
        through a task's prompts or zero-shot; task, top_k and labels as query parameters or form fields."""
        return await self._answer("/classify", ctx, time.perf_counter(), self._classify(image, ctx))

    @bentoml.api(route="/fuse")
    async def fuse(self, image: Path, text: Text, ctx: bentoml.Context, task: Text | None = None) -> dict[str, Any]:
        """Fuse an uploaded image with a text: multipart 'image' + 'text' (+ 'task' when several fusion tasks)."""
        return await self._answer("/fuse", ctx, time.perf_counter(), self._fuse(image, ctx))

    @bentoml.api(route="/embed")
    async def embed(self, ctx: bentoml.Context, image: Path = None,  # type: ignore[assignment]
                    text: Text | None = None, task: Text | None = None) -> dict[str, Any]:
        """L2-normalised embeddings of an image and/or a text: the bare backbone, or through a classification
        task's prompts (task=NAME). `image: Path` (not Path | None): BentoML's schema then calls it a file, and
        its client sends the request as multipart."""
        return await self._answer("/embed", ctx, time.perf_counter(), self._embed(image, ctx))

    def _admin_refusal(self, ctx: bentoml.Context) -> dict[str, Any] | None:
        """None when the caller may change what is served; else the 401/403 answer (status set on ctx)."""
        client = ctx.request.client
        if admin_authorized(ctx.request.headers.get("authorization"), CONFIG.admin_token,
                            client.host if client else None):
            return None
        if CONFIG.admin_token is None:
            ctx.response.status_code = 403
            return {"error": "without MMSERVE_ADMIN_TOKEN only callers on the server's own machine may reload; "
                             "set the token to reload from elsewhere"}
        ctx.response.status_code = 401
        return {"error": "admin token required: Authorization: Bearer $MMSERVE_ADMIN_TOKEN"}

    async def _admin_call(self, ctx: bentoml.Context, api: str, what: str, **kwargs: Any
                          ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(the engine's answer, {}) or, when the engine could not be reached, (None, the 503/500 answer)."""
        try:
            return await self._call(api, **kwargs), {}
        except Exception as exc:  # the engine unreachable or restarting, or a bug: a clear status, never a trace
            unavailable = engine_unavailable(exc)
            logger.exception("%s failed", what)
            ctx.response.status_code = 503 if unavailable else 500
            return None, {"error": "inference engine unavailable; retry" if unavailable else
                          f"{what} failed; see the server log"}

    @bentoml.api(route="/admin/reload")
    async def reload(self, ctx: bentoml.Context, path: str | None = None) -> dict[str, Any]:
        """Load a new registry version without restart: JSON {"path": DIR} or no body to re-read the current one."""
        refusal = self._admin_refusal(ctx)
        if refusal is not None:
            return refusal
        result, failure = await self._admin_call(ctx, "reload", f"registry reload of {path}", path=path)
        if result is None:
            return failure
        await self.engine_view(refresh=True)
        if not result.pop("ok"):
            ctx.response.status_code = 422
            return {"error": f"registry refused, still serving {result['serving_version']}: {result['error']}",
                    "serving_version": result["serving_version"]}
        return result

    async def _change(self, ctx: bentoml.Context, operation: str, **kwargs: Any) -> dict[str, Any]:
        refusal = self._admin_refusal(ctx)
        if refusal is not None:
            return refusal
        result, failure = await self._admin_call(ctx, "change", f"registry {operation}", operation=operation,
                                                 **kwargs)
        if result is None:
            return failure
        await self.engine_view(refresh=True)
        if not result.pop("ok"):
            ctx.response.status_code = 409 if result["conflict"] else 422
            return {"error": result["error"], "registry_version": result["serving_version"]}
        return result

    @bentoml.api(route="/admin/tasks")
    async def add_tasks(self, ctx: bentoml.Context, source: str, tasks: list[str] | None = None,
                        expected_version: str | None = None) -> dict[str, Any]:
        """Copy tasks (default all) from a registry directory or store URL into the served store: a new version,
        checked against the backbone before it is current; 409 when `expected_version` (or a racing writer) moved."""
        return await self._change(ctx, "add", source=source, tasks=tasks, expected_version=expected_version)

    @bentoml.api(route="/admin/tasks/delete")
    async def delete_tasks(self, ctx: bentoml.Context, tasks: list[str], expected_version: str | None = None
                           ) -> dict[str, Any]:
        """Remove tasks from the served store: a new version."""
        return await self._change(ctx, "remove", tasks=tasks, expected_version=expected_version)

    @bentoml.api(route="/admin/rollback")
    async def rollback(self, ctx: bentoml.Context, version: str | None = None, expected_version: str | None = None
                       ) -> dict[str, Any]:
        """Make an earlier version of the served store current again (default: the one before the current)."""
        return await self._change(ctx, "rollback", version=version, expected_version=expected_version)


def _count_refusal(scope: Any, status: int, seconds: float) -> None:
    """An upload UploadGuard refused, counted in the front's metrics like every answered request."""
    service = bentoml.get_current_service()
    if isinstance(service, MmServe.inner):
        service.metrics.record(scope["path"], service.task_label(Request(scope).query_params.get("task")), status,
                               seconds)


MmServe.add_asgi_middleware(UploadGuard, max_bytes=CONFIG.max_body_bytes, on_reject=_count_refusal, forms={
    "/classify": FormSpec(optional_texts=("task", "top_k", "labels")),
    "/fuse": FormSpec(texts=("text",), optional_texts=("task",)),
    "/embed": FormSpec(files=(), optional_files=("image",), optional_texts=("text", "task")),
})
