"""What the engine answers: predictions, classify and fuse results, reload results, per-request outcomes; JSON forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmserve.errors import RequestError, request_error


@dataclass(frozen=True)
class Prediction:
    """One class and its probability."""

    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"label": self.label, "score": self.score}


def predictions(items: tuple[Prediction, ...]) -> list[dict[str, Any]]:
    """JSON form of a ranked list of predictions."""
    return [p.to_dict() for p in items]


@dataclass(frozen=True)
class ClassifyResult:
    """The answer to one classification request."""

    task: str
    top_k: tuple[Prediction, ...]  # best first; never empty
    registry_version: str

    @property
    def label(self) -> str:
        """The best class."""
        return self.top_k[0].label

    @property
    def score(self) -> float:
        """The best class's probability."""
        return self.top_k[0].score

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {task, label, score, top_k: [{label, score}], registry_version}."""
        return {"task": self.task, "label": self.label, "score": self.score, "top_k": predictions(self.top_k),
                "registry_version": self.registry_version}


@dataclass(frozen=True)
class FuseResult:
    """The answer to one fusion request: the label (multi-class) or the labels above threshold (multi-label)."""

    task: str
    head: str
    scores: tuple[Prediction, ...]  # every class, best first
    registry_version: str
    threshold: float | None = None  # multi-label only

    @property
    def labels(self) -> tuple[Prediction, ...]:
        """Multi-label: the classes above threshold (best first); multi-class: the top class."""
        if self.head == "multilabel":
            threshold = 0.5 if self.threshold is None else float(self.threshold)
            return tuple(p for p in self.scores if p.score > threshold)
        return self.scores[:1]

    def to_dict(self) -> dict[str, Any]:
        """JSON form; multi-class: label + score; multi-label: labels above threshold; both: every score."""
        out: dict[str, Any] = {"task": self.task, "head": self.head}
        if self.head == "multilabel":
            out["labels"] = predictions(self.labels)
            out["threshold"] = self.threshold
        else:
            out["label"], out["score"] = self.scores[0].label, self.scores[0].score
        out["scores"] = predictions(self.scores)
        out["registry_version"] = self.registry_version
        return out


@dataclass(frozen=True)
class ReloadResult:
    """What an admin reload did."""

    previous_version: str
    version: str
    root: Path
    tasks: int

    @property
    def changed(self) -> bool:
        """True when the served registry version differs from the previous one."""
        return self.previous_version != self.version

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"previous_version": self.previous_version, "version": self.version, "changed": self.changed,
                "path": str(self.root), "tasks": self.tasks}


@dataclass(frozen=True)
class Outcome:
    """Per-request answer in a batch: a JSON-able result, or that request's own error (type, message, details)."""

    result: dict[str, Any] | None = None
    error_type: str | None = None  # the class name of the request's RequestError; None when answered
    error: str | None = None  # its message
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the request was answered."""
        return self.error_type is None

    @classmethod
    def failure(cls, exc: RequestError) -> Outcome:
        """The outcome of a request refused with `exc`."""
        return cls(error_type=type(exc).__name__, error=str(exc), details=dict(exc.details))

    def exception(self) -> RequestError | None:
        """The error of a refused request, rebuilt from its type name (None when answered)."""
        return None if self.error_type is None else request_error(self.error_type, self.error or "", self.details)

    def to_dict(self) -> dict[str, Any]:
        """JSON form exchanged between the service processes."""
        return {"result": self.result, "error_type": self.error_type, "error": self.error, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        """The inverse of to_dict."""
        return cls(data.get("result"), data.get("error_type"), data.get("error"), dict(data.get("details") or {}))
