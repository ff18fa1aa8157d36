"""Embeddings: L2-normalised image and text features from the frozen backbone, optionally through a task's prompts.

With no task an image embedding is open_clip's `encode_image` and a text embedding its `encode_text`, normalised
(the prompted towers run open_clip's own blocks, and with no prompts nothing is swapped in). With a classification
task the image goes through the task's visual prompts and the text through its text prompts, so embeddings land
in the space the task's classifier scores in. Texts longer than the context are truncated the way open_clip's
tokenizer truncates them (the last kept token becomes EOT).

`embed_requests` answers a batch of independent requests (each an image and/or a text, any mix of tasks) with
one image-tower pass per visual prompt shape and one text-tower pass per task, one Outcome per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmserve.answers import Outcome
from mmserve.engine import InferenceEngine
from mmserve.errors import MissingInputError, RequestError
from mmserve.snapshot import ClassifyTask, Snapshot

__all__ = ["EmbedRequest", "classify_entry", "embed_requests", "embed_texts", "task_text_prompts"]


@dataclass(frozen=True)
class EmbedRequest:
    """One preprocessed image (3, S, S) and/or one text to embed, through task `task`'s prompts when given."""

    image: torch.Tensor | np.ndarray | None = None
    text: str | None = None
    task: str | None = None


def task_text_prompts(entry: ClassifyTask | None) -> torch.Tensor | None:
    """A classification task's text-tower prompts (K, P_l, d_l), None without a task or without text prompts."""
    if entry is None:
        return None
    prompts = entry.text_prompts  # read from the registry at each call: callers cache what they derive
    return None if prompts is None or prompts.shape[-2] == 0 else prompts


@torch.inference_mode()
def embed_texts(engine: InferenceEngine, texts: Sequence[str], entry: ClassifyTask | None = None) -> torch.Tensor:
    """Normalised text features (N, E) of `texts`, through `entry`'s text prompts when given (one tower pass)."""
    prompts = task_text_prompts(entry)
    n_prompt = 0 if prompts is None else int(prompts.shape[-2])
    tokens = engine.text_encoder.tokenize(texts, n_prompt, truncate=True).to(engine.backbone.device)
    return engine.text_encoder(tokens, prompts)


def classify_entry(snap: Snapshot, task: str | None) -> ClassifyTask | None:
    """The classification task `task` of a snapshot (None for None); UnknownTaskError / WrongTaskKindError."""
    if task is None:
        return None
    entry = snap.require(task, "classify")
    assert isinstance(entry, ClassifyTask)
    return entry


def embed_requests(engine: InferenceEngine, requests: Sequence[EmbedRequest]) -> list[Outcome]:
    """Answer independent embedding requests: one image pass per prompt shape, one text pass per task; a bad
    request fails alone. A result: {task, dim, image_embedding?, text_embedding?, registry_version}."""
    snap = engine.snapshot
    outcomes: list[Outcome | None] = [None] * len(requests)
    images: dict[int, torch.Tensor] = {}
    texts: dict[str | None, list[int]] = {}
    for i, req in enumerate(requests):
        try:
            entry = classify_entry(snap, req.task)
            if req.image is None and req.text is None:
                raise MissingInputError("send an image, a text or both")
            if req.text is not None and not req.text.strip():
                raise MissingInputError("field 'text' must not be empty")
            if req.image is not None:
                images[i] = engine.check_image(req.image)
            if req.text is not None:
                texts.setdefault(None if entry is None else req.task, []).append(i)
        except RequestError as exc:
            outcomes[i] = Outcome.failure(exc)
    good = [i for i in range(len(requests)) if outcomes[i] is None]
    image_rows = [i for i in good if i in images]
    image_feats: dict[int, list[float]] = {}
    if image_rows:
        feats = engine.encode_images(torch.stack([images[i] for i in image_rows]),
                             [classify_entry(snap, requests[i].task) for i in image_rows]).float().cpu()
        image_feats = {i: feats[row].tolist() for row, i in enumerate(image_rows)}
    text_feats: dict[int, list[float]] = {}
    for task, rows in texts.items():
        rows = [i for i in rows if outcomes[i] is None]
        entry = classify_entry(snap, task)
        feats = embed_texts(engine, [requests[i].text or "" for i in rows], entry).float().cpu()
        text_feats.update({i: feats[row].tolist() for row, i in enumerate(rows)})
    dim = int(engine.backbone.embed_dim)
    for i in good:
        result: dict[str, object] = {"task": requests[i].task, "dim": dim}
        if i in image_feats:
            result["image_embedding"] = image_feats[i]
        if i in text_feats:
            result["text_embedding"] = text_feats[i]
        result["registry_version"] = snap.version
        outcomes[i] = Outcome(result)
    return outcomes  # type: ignore[return-value]
