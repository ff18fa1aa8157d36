"""The HTTP contract: the OpenAPI document GET /docs.json serves, BentoML's own made complete.

BentoML generates the infrastructure endpoints and one POST per API, with only the API's declared arguments and
the statuses 200/400/404/500. This module keeps BentoML's document and writes every mmserve operation in full:
the query parameters `task`, `top_k` and `labels` with their types and bounds, the multipart body with the image's
media types, the reply schemas, and every status the server answers, each with the `{"error": ...}` body and an
example; it adds GET /tasks (a Starlette route mounted beside the APIs, which BentoML does not list) and the
503 of /readyz. `task` is an enum of the tasks being served when the document is asked for.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from mmserve.vocab import LABELS_PATTERN, MAX_LABEL_CHARS, MAX_LABELS

IMAGE_TYPES = "image/png, image/jpeg, image/gif, image/webp, image/bmp, image/tiff"
REF = "#/components/schemas/{}"

ERRORS: dict[int, tuple[str, str]] = {  # status -> (when, an example message)
    400: ("Unusable input: not an image, truncated, a decompression bomb, malformed multipart, a field the endpoint "
          "does not take, a task of the other kind, a bad top_k or labels",
          "not an image: the upload is in no format Pillow can identify"),
    401: ("MMSERVE_ADMIN_TOKEN is set and the request has no matching Authorization: Bearer header",
          "admin token required: Authorization: Bearer $MMSERVE_ADMIN_TOKEN"),
    403: ("No admin token is configured and the caller is not on the server's own machine",
          "without MMSERVE_ADMIN_TOKEN only callers on the server's own machine may reload; set the token to "
          "reload from elsewhere"),
    404: ("Unknown task (the body lists the known ones)", "unknown task 'clipart'; known classify tasks: noto"),
    409: ("Another change moved the store first (expected_version is stale)",
          "HEAD moved: expected version 1e2edfd2d719, the store is at 5c0ffee00000"),
    413: ("Body over MMSERVE_MAX_BODY_BYTES",
          "request body is over the limit of 10485760 bytes (MMSERVE_MAX_BODY_BYTES)"),
    415: ("Not the body type the endpoint takes (uploads: multipart/form-data; admin: JSON)",
          "send multipart/form-data with the image as a file part, e.g. curl -F image=@photo.jpg; got content-type "
          "'application/json'"),
    422: ("A required part is missing or empty (an upload's image or text, the task), or a registry is refused "
          "(admin)", "multipart field 'text' is required"),
    500: ("A bug (logged with its trace on the server)", "internal error; see the server log"),
    503: ("Retry later: the batch queue is past MMSERVE_MAX_LATENCY_MS, or the engine is unreachable",
          "inference engine unavailable; retry"),
}
UPLOAD_STATUSES = (400, 404, 413, 415, 422, 500, 503)
ADMIN_STATUSES = (400, 401, 403, 413, 415, 422, 500, 503)

PREDICTION = {"type": "object", "required": ["label", "score"],
              "properties": {"label": {"type": "string"}, "score": {"type": "number", "minimum": 0, "maximum": 1}}}
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error"], "description": "Every refusal and failure",
              "properties": {"error": {"type": "string"},
                             "known_tasks": {"type": "array", "items": {"type": "string"}},
                             "serving_version": {"type": "string"}, "registry_version": {"type": "string"}}},
    "Prediction": PREDICTION,
    "ClassifyResult": {
        "type": "object", "required": ["task", "label", "score", "top_k", "registry_version"],
        "properties": {"task": {"type": "string", "nullable": True, "description": "null: zero-shot labels"},
                       "label": {"type": "string"}, "score": {"type": "number", "minimum": 0, "maximum": 1},
                       "top_k": {"type": "array", "minItems": 1, "items": {"$ref": REF.format("Prediction")}},
                       "registry_version": {"type": "string"}},
        "example": {"task": "fluent_flat", "label": "tool", "score": 0.227,
                    "top_k": [{"label": "tool", "score": 0.227}], "registry_version": "1e2edfd2d719"}},
    "FuseResult": {
        "type": "object", "required": ["task", "head", "scores", "registry_version"],
        "properties": {"task": {"type": "string"}, "head": {"type": "string", "enum": ["multiclass", "multilabel"]},
                       "label": {"type": "string", "description": "multiclass: the best class"},
                       "score": {"type": "number", "minimum": 0, "maximum": 1},
                       "labels": {"type": "array", "items": {"$ref": REF.format("Prediction")},
                                  "description": "multilabel: the classes above the threshold"},
                       "threshold": {"type": "number", "nullable": True},
                       "scores": {"type": "array", "items": {"$ref": REF.format("Prediction")}},
                       "registry_version": {"type": "string"}},
        "example": {"task": "emoji_subgroup", "head": "multiclass", "label": "tool", "score": 0.881,
                    "scores": [{"label": "tool", "score": 0.881}], "registry_version": "1e2edfd2d719"}},
    "EmbedResult": {
        "type": "object", "required": ["task", "dim", "registry_version"],
        "properties": {"task": {"type": "string", "nullable": True}, "dim": {"type": "integer", "minimum": 1},
                       "image_embedding": {"type": "array", "items": {"type": "number"},
                                           "description": "L2-normalised, dim floats"},
                       "text_embedding": {"type": "array", "items": {"type": "number"},
                                          "description": "L2-normalised, dim floats"},
                       "registry_version": {"type": "string"}},
        "example": {"task": None, "dim": 3, "image_embedding": [0.6, 0.8, 0.0], "registry_version": "1e2edfd2d719"}},
    "TaskList": {
        "type": "object", "required": ["registry_version", "tasks"],
        "properties": {"registry_version": {"type": "string"}, "registry_loaded_at": {"type": "string"},
                       "runtime": {"type": "string"}, "backbone": {"type": "object"},
                       "tasks": {"type": "array", "items": {
                           "type": "object", "required": ["name", "kind", "endpoint", "classes"],
                           "properties": {"name": {"type": "string"},
                                          "kind": {"type": "string", "enum": ["classify", "fuse"]},
                                          "endpoint": {"type": "string", "enum": ["/classify", "/fuse"]},
                                          "group": {"type": "string", "nullable": True},
                                          "classes": {"type": "array", "items": {"type": "string"}},
                                          "metrics": {"type": "object"}}}}}},
    "AdminResult": {"type": "object", "description": "What the change did: versions before and after, tasks",
                    "properties": {"previous_version": {"type": "string"}, "version": {"type": "string"},
                                   "changed": {"type": "boolean"}, "registry_version": {"type": "string"}}},
}


def _json(schema: str, description: str, example: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": {"$ref": REF.format(schema)}}
    if example is not None:
        content["example"] = example
    return {"description": description, "content": {"application/json": content}}


def _responses(ok: str, ok_description: str, statuses: Sequence[int]) -> dict[str, Any]:
    out = {"200": _json(ok, ok_description)}
    for status in statuses:
        when, message = ERRORS[status]
        out[str(status)] = _json("Error", when, {"error": message})
    return out


def _task_schema(names: Sequence[str] | None, kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1,
                              "description": f"a {kind} task's name (GET /tasks); the form field's wins over the "
                                             f"query's, and every value given must be valid"}
    if names:
        schema["enum"] = list(names)
        schema["example"] = names[0]
    return schema


TOP_K = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5,
         "description": "how many classes to list (more than the classes: all of them)"}
LABELS = {"type": "string", "pattern": LABELS_PATTERN, "maxLength": MAX_LABELS * (MAX_LABEL_CHARS + 16),
          "example": "cat,dog,a red car",
          "description": f"comma-separated labels to rank instead of a task's classes (1 to {MAX_LABELS}, each 1 to "
                         f"{MAX_LABEL_CHARS} characters once stripped), through the task's prompts or, with no "
                         f"task, zero-shot with the registry's default template"}
TEXT = {"type": "string", "minLength": 1, "pattern": r"\S", "description": "any text with a non-blank character; "
        "a JSON string literal (as BentoML's client sends it) is decoded, anything else read exactly as sent"}


def _query(name: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": dict(schema),
            "description": schema.get("description", "")}


def _upload(description: str, properties: Mapping[str, Any], required: Sequence[str],
            query: Sequence[dict[str, Any]], ok: str, name: str, one_of: Sequence[str] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "object", "properties": dict(properties), "additionalProperties": False}
    if required:
        body["required"] = list(required)
    if one_of:  # at least one of these fields
        body["anyOf"] = [{"required": [field]} for field in one_of]
    return {"post": {
        "tags": ["Service APIs"], "operationId": f"mmserve__{name}", "x-bentoml-name": name,
        "description": description, "parameters": list(query),
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": body,
            "encoding": {"image": {"contentType": IMAGE_TYPES}}}}},
        "responses": _responses(ok, f"{ok}", UPLOAD_STATUSES)}}


def _admin(description: str, properties: Mapping[str, Any], required: Sequence[str], name: str,
           conflict: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "object", "properties": dict(properties)}
    if required:
        body["required"] = list(required)
    statuses = sorted({*ADMIN_STATUSES, *((409,) if conflict else ())})
    return {"post": {
        "tags": ["Service APIs"], "operationId": f"mmserve__{name}", "x-bentoml-name": name,
        "description": description,
        "requestBody": {"required": bool(required), "content": {"application/json": {"schema": body}}},
        "responses": _responses("AdminResult", "the change, done", statuses)}}


def document(bentoml_spec: Mapping[str, Any], tasks: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    """The contract: BentoML's document with every mmserve operation written in full; `tasks`: the served task
    names by kind (None when the engine cannot be asked: `task` then has no enum)."""
    spec = copy.deepcopy(dict(bentoml_spec))
    classify = None if tasks is None else list(tasks.get("classify", []))
    fuse = None if tasks is None else list(tasks.get("fuse", []))
    image = {"type": "string", "format": "binary", "description": f"the picture ({IMAGE_TYPES})"}
    version = {"type": "string", "nullable": True, "description": "a store version (mmserve registry history)"}
    names = {"type": "array", "items": {"type": "string", "minLength": 1}}
    paths = spec.setdefault("paths", {})
    paths.update({
        "/classify": _upload(
            "Classify an image with a task's classes, or rank the caller's labels (labels=a,b,c) through a task's "
            "prompts or zero-shot. task, top_k and labels as query parameters or form fields; task or labels is "
            "required (422 without either).",
            {"image": image, "task": _task_schema(classify, "classify"), "top_k": TOP_K, "labels": LABELS},
            ["image"], [_query("task", _task_schema(classify, "classify")), _query("top_k", TOP_K),
                        _query("labels", LABELS)], "ClassifyResult", "classify"),
        "/fuse": _upload(
            "Fuse an image with a text: the label (multiclass) or the labels above the threshold (multilabel). "
            "task may be left out when one fusion task is served.",
            {"image": image, "text": TEXT, "task": _task_schema(fuse, "fusion")}, ["image", "text"],
            [_query("task", _task_schema(fuse, "fusion"))], "FuseResult", "fuse"),
        "/embed": _upload(
            "L2-normalised embeddings of an image and/or a text (422 with neither): the bare backbone (open_clip's "
            "encode_image / encode_text), or through a classification task's prompts. Long texts are truncated.",
            {"image": image, "text": TEXT, "task": _task_schema(classify, "classify")}, [],
            [_query("task", _task_schema(classify, "classify"))], "EmbedResult", "embed", one_of=("image", "text")),
        "/admin/reload": _admin(
            "Load a registry version without restart: {\"path\": DIR} or no body to re-read the current one; a "
            "registry that fails validation is refused (422) and the old one keeps serving.",
            {"path": {"type": "string", "nullable": True}}, [], "reload", False),
        "/admin/tasks": _admin(
            "Copy tasks (default all) from a registry directory or store URL into the served store.",
            {"source": {"type": "string"}, "tasks": {**names, "nullable": True}, "expected_version": version},
            ["source"], "add_tasks", True),
        "/admin/tasks/delete": _admin("Remove tasks from the served store: a new version.",
                                      {"tasks": names, "expected_version": version}, ["tasks"], "delete_tasks", True),
        "/admin/rollback": _admin(
            "Make an earlier version of the served store current again (default: the one before the current).",
            {"version": version, "expected_version": version}, [], "rollback", True),
        "/tasks": {"get": {
            "tags": ["Service APIs"], "operationId": "mmserve__tasks",
            "description": "Every task's name, kind, endpoint, group, classes and metrics; the registry version.",
            "responses": {"200": _json("TaskList", "the tasks served"), "503": _json(
                "Error", ERRORS[503][0], {"error": "inference engine unavailable, retry"})}}},
    })
    readyz = paths.get("/readyz", {}).get("get")
    if readyz is not None:
        readyz.setdefault("responses", {})["503"] = {"description": "not ready: starting, or the registry store "
                                                                    "does not answer (the last version serves)"}
    spec.setdefault("components", {}).setdefault("schemas", {}).update(copy.deepcopy(SCHEMAS))
    return spec
