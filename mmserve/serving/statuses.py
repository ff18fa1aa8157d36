"""The one map from what a request did wrong to the HTTP status the service answers it with.

The engine and the front raise typed errors (mmserve.errors, plus the upload decoder's ImageError); this table
is the only place that knows which status each one gets. The message and details come from the error itself.
"""

from __future__ import annotations

from typing import Any

from mmserve.answers import Outcome
from mmserve.errors import (
    BodyTooLargeError,
    InvalidInputError,
    MissingInputError,
    MissingTaskError,
    RequestError,
    TaskUnavailableError,
    UnknownTaskError,
    UnsupportedMediaTypeError,
    WrongTaskKindError,
)
from mmserve.images import ImageError

STATUSES: dict[type[Exception], int] = {
    RequestError: 400,
    InvalidInputError: 400,
    ImageError: 400,
    WrongTaskKindError: 400,
    UnknownTaskError: 404,
    BodyTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    MissingInputError: 422,
    MissingTaskError: 422,
    TaskUnavailableError: 503,  # registered, but the store cannot give it now: try again
}
REFUSALS = (RequestError, ImageError)  # what a request is refused with: a 4xx of its own, never a 500
OK = 200


def status_for(exc: BaseException) -> int:
    """The HTTP status for an error: that of its nearest class in STATUSES; 500 for anything else (a bug)."""
    return next((STATUSES[cls] for cls in type(exc).__mro__ if cls in STATUSES), 500)


def error_body(exc: BaseException) -> dict[str, Any]:
    """The JSON body of a refusal: {"error": message, **details}."""
    return {"error": str(exc), **getattr(exc, "details", {})}


def outcome_status(outcome: Outcome) -> int:
    """The HTTP status an engine outcome is answered with: 200 when answered, else its error's."""
    error = outcome.exception()
    return OK if error is None else status_for(error)
