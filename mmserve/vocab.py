"""Open vocabulary: rank labels the caller sends, through a task's prompts or zero-shot, with cached label features.

`/classify?labels=cat,dog` ranks the caller's labels instead of a task's fixed classes. With a task, each label is
put into the task's template and run through its text prompts (its visual prompts see the image), exactly as the
task's own class features were made; with no task it is plain zero-shot CLIP with the template every
classification task of the registry shares (Snapshot.zero_shot_template; DEFAULT_TEMPLATE when they differ).
Label text features are cached per (task build, label) in a bounded LRU, so a repeated label list costs no
text-tower pass; a task build is the snapshot builder's build key (weights, prompt config, template, group), so a
reload that changes a task's prompts never reuses the old features, and one that keeps them keeps the cache.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmserve.answers import ClassifyResult, Outcome, Prediction
from mmserve.embed import classify_entry, embed_texts
from mmserve.engine import InferenceEngine
from mmserve.errors import InvalidInputError, MissingInputError, RequestError
from mmserve.registry import DEFAULT_TEMPLATE
from mmserve.snapshot import ClassifyTask, format_template

__all__ = ["LABEL_CACHE_SIZE", "LABELS_PATTERN", "MAX_LABEL_CHARS", "MAX_LABELS", "LabelCache", "LabelRequest",
           "parse_labels", "rank_label_requests"]

MAX_LABELS = 64  # labels in one request
MAX_LABEL_CHARS = 64  # characters of one label (after stripping surrounding whitespace)
LABEL_CACHE_SIZE = 4096  # label text features kept (each embed_dim floats)
# one label: no comma, not blank, at most MAX_LABEL_CHARS characters once surrounding whitespace is stripped
_LABEL = rf"\s*[^,\s](?:[^,]{{0,{MAX_LABEL_CHARS - 2}}}[^,\s])?\s*"
LABELS_PATTERN = rf"^{_LABEL}(?:,{_LABEL}){{0,{MAX_LABELS - 1}}}$"  # what parse_labels accepts, for the schema


def parse_labels(raw: str) -> list[str]:
    """Comma-separated labels, each stripped; InvalidInputError past the limits or for a blank label."""
    labels = [label.strip() for label in raw.split(",")]
    if len(labels) > MAX_LABELS:
        raise InvalidInputError(f"at most {MAX_LABELS} labels per request, got {len(labels)}")
    for n, label in enumerate(labels):
        if not label:
            raise InvalidInputError(f"labels: label {n + 1} is empty (send labels=cat,dog,...)")
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidInputError(f"labels: label {n + 1} is {len(label)} characters long; at most "
                                    f"{MAX_LABEL_CHARS}")
    if not re.fullmatch(LABELS_PATTERN, raw):  # never more lenient than the schema's pattern (tests: they agree)
        raise InvalidInputError(f"labels must match {LABELS_PATTERN}")
    return labels


@dataclass(frozen=True)
class LabelRequest:
    """One preprocessed image (3, S, S) to rank `labels` for, through task `task` (None: zero-shot)."""

    image: torch.Tensor | np.ndarray
    labels: tuple[str, ...]
    task: str | None = None
    top_k: int = 5


class LabelCache:
    """Label text features (E,) per (task build, label), least recently used dropped past `size` entries."""

    def __init__(self, size: int = LABEL_CACHE_SIZE):
        self.size = size
        self._features: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0  # labels run through the text tower (misses)

    def features(self, engine: InferenceEngine, entry: ClassifyTask | None, labels: Sequence[str],
                 template: str) -> torch.Tensor:
        """Normalised features (L, E) of `labels` put into `template`, through `entry`'s text prompts (None:
        zero-shot); misses in one text-tower pass. Cached by what they depend on: the task's build key (weights,
        config, template, group; the snapshot builder's) or zero-shot, and the template; a task without a build
        key is never cached."""
        build = f"zero-shot|{template}" if entry is None else f"{entry.key}|{template}" if entry.key else None
        with self._lock:
            found = {label: None if build is None else self._features.get((build, label))
                     for label in dict.fromkeys(labels)}
            for label, feats in found.items():
                if feats is not None:
                    self._features.move_to_end((build, label))
        missing = [label for label, feats in found.items() if feats is None]
        if missing:
            fresh = embed_texts(engine, [format_template(template, label) for label in missing], entry)
            with self._lock:
                self.computed += len(missing)
                for label, feats in zip(missing, fresh, strict=True):
                    found[label] = feats
                    if build is not None:
                        self._features[(build, label)] = feats
                        self._features.move_to_end((build, label))
                while len(self._features) > self.size:
                    self._features.popitem(last=False)
        return torch.stack([found[label] for label in labels])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._features)


def rank_label_requests(engine: InferenceEngine, cache: LabelCache, requests: Sequence[LabelRequest]
                        ) -> list[Outcome]:
    """Answer independent label-ranking requests: one image pass per prompt shape, label features from the
    cache; a bad request fails alone. A result has /classify's form, with `task` null for zero-shot."""
    snap = engine.snapshot
    outcomes: list[Outcome | None] = [None] * len(requests)
    good: list[int] = []
    images: list[torch.Tensor] = []
    for i, req in enumerate(requests):
        try:
            classify_entry(snap, req.task)
            if not req.labels:
                raise MissingInputError("labels: send at least one label")
            if len(req.labels) > MAX_LABELS or any(len(x) > MAX_LABEL_CHARS or not x.strip() for x in req.labels):
                raise InvalidInputError(f"labels: 1 to {MAX_LABELS} non-blank labels of at most {MAX_LABEL_CHARS} "
                                        f"characters")
            images.append(engine.check_image(req.image))
            good.append(i)
        except RequestError as exc:
            outcomes[i] = Outcome.failure(exc)
    if not good:
        return outcomes  # type: ignore[return-value]
    with torch.inference_mode():
        entries = [classify_entry(snap, requests[i].task) for i in good]
        feats = engine.encode_images(torch.stack(images), entries)
        scale = engine.backbone.logit_scale
        for row, i in enumerate(good):
            req = requests[i]
            entry = entries[row]
            template = snap.zero_shot_template if entry is None else entry.info.template or DEFAULT_TEMPLATE
            text = cache.features(engine, entry, req.labels, template).to(feats.device)
            probs = (scale * feats[row] @ text.T).softmax(dim=-1).cpu()
            k = max(1, min(int(req.top_k), len(req.labels)))
            order = probs.argsort(descending=True)[:k].tolist()
            top = tuple(Prediction(req.labels[j], float(probs[j])) for j in order)
            outcomes[i] = Outcome(ClassifyResult(req.task, top, snap.version).to_dict())  # type: ignore[arg-type]
    return outcomes  # type: ignore[return-value]
