"""Exceptions that carry a message fit to show a user (no stack trace needed), and the one check of a task name.

`RequestError` and its subclasses are what one request did wrong. The engine raises them and the service front
raises them; an engine answer names one by its class name, and only the service maps them to HTTP statuses
(mmserve/serving/statuses.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class MmserveError(Exception):
    """Base class for errors whose message is meant for the user."""


class BackboneLoadError(MmserveError):
    """The backbone could not be created or its weights could not be loaded."""


class PromptConfigError(MmserveError, ValueError):
    """A prompt configuration is inconsistent with itself or with the backbone."""


class RegistryError(MmserveError):
    """A registry directory is invalid; the message names the file and the field."""


class RuntimeUnavailableError(MmserveError):
    """The configured image-tower runtime cannot be used in this installation."""


class RequestError(MmserveError):
    """One request cannot be answered as sent; `details` go to its client beside the message."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.details = details


class InvalidInputError(RequestError):
    """A part of the request has a value that cannot be used (an image of the wrong shape, top_k 0, ...)."""


class MissingInputError(RequestError):
    """A part the request needs is absent or empty."""


class BodyTooLargeError(RequestError):
    """The request body is over the configured size limit."""


class UnsupportedMediaTypeError(RequestError):
    """The request body is not of a media type the endpoint takes."""


class MissingTaskError(RequestError):
    """The request names no task where one is needed."""


class UnknownTaskError(RequestError):
    """No task of that name in the registry version being served."""


class WrongTaskKindError(RequestError):
    """The task exists but is of the other kind (a fusion task sent to classification or the reverse)."""


class TaskUnavailableError(RequestError):
    """The task is registered but could not be loaded from the store now (unreachable, or a blob it names)."""


def _by_name(cls: type[RequestError]) -> dict[str, type[RequestError]]:
    out = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        out.update(_by_name(sub))
    return out


def request_error(name: str, message: str, details: Mapping[str, Any] | None = None) -> RequestError:
    """The RequestError class called `name` (as an engine answer names it), with its message and details."""
    return _by_name(RequestError).get(name, RequestError)(message, **dict(details or {}))


# per task kind: how its tasks are listed, what one is called, and where it is sent
KIND_LISTED = {"classify": "classify", "fuse": "fusion"}
KIND_NAMED = {"classify": "classification", "fuse": "fusion"}
KIND_SENT = {"classify": "send it to POST /classify?task={name}",
             "fuse": "send it to POST /fuse with an image and a text"}


def require_task(kinds: Mapping[str, str], name: str, kind: str) -> None:
    """Raise UnknownTaskError / WrongTaskKindError unless task `name` is of `kind`; `kinds`: every task's kind."""
    actual = kinds.get(name)
    if actual == kind:
        return
    known = [n for n, k in kinds.items() if k == kind]
    if actual is None:
        listed = ", ".join(known) or "(none)"
        raise UnknownTaskError(f"unknown task '{name}'; known {KIND_LISTED[kind]} tasks: {listed}", known_tasks=known)
    raise WrongTaskKindError(f"task '{name}' is a {KIND_NAMED[actual]} task: {KIND_SENT[actual].format(name=name)}",
                             known_tasks=known)
