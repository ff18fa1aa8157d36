"""UploadGuard: the ASGI middleware in front of the upload APIs (body size limit, multipart shape checks).

BentoML parses uploads before an API function runs, and some malformed bodies (no multipart boundary, a text
field where the image file belongs, ...) make that parser fail with a 500. The guard reads the body once
(refusing it past the limit), checks that it parses and has the right fields, then replays it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from mmserve.errors import (
    BodyTooLargeError,
    InvalidInputError,
    MissingInputError,
    RequestError,
    UnsupportedMediaTypeError,
)
from mmserve.serving.statuses import error_body, status_for

FORM_TEXTS = "mmserve.form_texts"  # ASGI scope key: the text fields of a checked multipart body, exactly as sent
MAX_FILE_NAME_BYTES = 200  # BentoML keeps the upload's file name as a temp file suffix; NAME_MAX is 255 bytes


@dataclass(frozen=True)
class FormSpec:
    """Multipart fields an upload endpoint requires: file parts and text parts."""

    files: tuple[str, ...] = ("image",)
    texts: tuple[str, ...] = ()
    optional_texts: tuple[str, ...] = ()
    optional_files: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        """Every field the endpoint takes, in order."""
        return (*self.files, *self.optional_files, *self.texts, *self.optional_texts)


def file_name_bytes(filename: str) -> bytes:
    """The bytes of an upload's file name that BentoML puts into its temp file name (the basename)."""
    return os.path.basename(filename).encode("utf-8", "surrogatepass")


def _check_files(form: Any, spec: FormSpec) -> None:
    for name in (*spec.files, *spec.optional_files):
        value = form.get(name)
        if value is None:
            if name in spec.optional_files:
                continue
            raise MissingInputError(f"multipart field '{name}' (an image file) is required")
        if not isinstance(value, UploadFile):
            raise InvalidInputError(f"multipart field '{name}' must be a file part (curl -F {name}=@photo.jpg)")
        if value.filename is not None and len(file_name_bytes(value.filename)) > MAX_FILE_NAME_BYTES:
            raise InvalidInputError(f"file name of '{name}' is too long: over {MAX_FILE_NAME_BYTES} bytes in UTF-8 "
                                    f"(it becomes part of a temp file name)")


def _check_texts(form: Any, spec: FormSpec) -> dict[str, str]:
    texts: dict[str, str] = {}
    for name in (*spec.texts, *spec.optional_texts):
        value = form.get(name)
        if value is None:
            if name in spec.texts:
                raise MissingInputError(f"multipart field '{name}' is required")
            continue
        if isinstance(value, UploadFile):
            raise InvalidInputError(f"multipart field '{name}' must be a text field, not a file")
        try:
            json.loads(value)  # BentoML JSON-decodes text fields; pathological nesting would crash it
        except ValueError:
            pass
        except RecursionError:
            raise InvalidInputError(f"multipart field '{name}' is nested too deeply") from None
        texts[name] = value
    return texts


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _check_json_body(scope: Any) -> None:
    """The JSON APIs (the admin ones) take JSON or no body: a form body is refused with 415 (BentoML's form parser
    would answer a multipart body without a boundary with a 500)."""
    content_type = Headers(scope=scope).get("content-type", "").lower()
    if content_type.startswith(FORM_TYPES):
        raise UnsupportedMediaTypeError(f"{scope['path']} takes a JSON body (content-type: application/json), got "
                                        f"content-type {content_type[:100]!r}")


@dataclass
class UploadGuard:
    """ASGI middleware before the APIs: body size limit (413), multipart shape checks (400/415/422) of the upload
    APIs, and no form bodies on the JSON APIs (415)."""

    app: Any
    max_bytes: int
    forms: Mapping[str, FormSpec] = field(default_factory=dict)
    on_reject: Callable[[Any, int, float], None] | None = None  # (scope, status, seconds) of a refused upload

    async def _reject(self, scope: Any, receive: Any, send: Any, exc: RequestError, started: float) -> None:
        status = status_for(exc)
        if self.on_reject is not None and scope["path"] in self.forms:
            self.on_reject(scope, status, time.perf_counter() - started)
        await JSONResponse(error_body(exc), status_code=status)(scope, receive, send)

    async def _check_form(self, scope: Any, body: bytes, spec: FormSpec) -> None:
        """Raise a RequestError unless the body is a multipart form with the fields of `spec`; its text fields, as
        sent, are left in scope[FORM_TEXTS]."""
        content_type = Headers(scope=scope).get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise UnsupportedMediaTypeError(
                "send multipart/form-data with the image as a file part, e.g. curl -F image=@photo.jpg; "
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
            raise InvalidInputError(f"malformed multipart body: {getattr(exc, 'detail', None) or exc}") from None
        try:
            _check_files(form, spec)
            texts = _check_texts(form, spec)
            unexpected = next((name for name in form if name not in spec.fields), None)
            if unexpected is not None:  # BentoML's parser crashes on some extra parts (undecodable files, ...)
                raise InvalidInputError(f"unexpected multipart field {unexpected[:100]!r}; {scope['path']} takes: "
                                        f"{', '.join(spec.fields)}")
        finally:
            await form.close()
        scope[FORM_TEXTS] = texts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass everything but POST bodies straight through; check, buffer and replay POST bodies."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        length = Headers(scope=scope).get("content-length")
        too_big = f"request body is over the limit of {self.max_bytes} bytes (MMSERVE_MAX_BODY_BYTES)"
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send, BodyTooLargeError(f"{too_big}: {length} bytes"), started)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send, BodyTooLargeError(too_big), started)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        spec = self.forms.get(scope["path"])
        try:
            if spec is not None:
                await self._check_form(scope, body, spec)
            else:
                _check_json_body(scope)
        except RequestError as exc:
            return await self._reject(scope, receive, send, exc, started)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
