"""Choice of the class-prompt template, made on the k-shot TRAIN images only (never the test split)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mmserve.fileio import atomic_write_bytes
from mmserve.registry import DEFAULT_TEMPLATE
from training.classify import Towers
from training.options import Opt
from training.splits import Split
from training.zeroshot import zero_shot

AUTO = "auto"
AUTO_TEMPLATE = Opt("--template", help="class prompt template, or auto: chosen on the k-shot train images "
                                       "(training.templates)")
# the phrasings of the pretraining captions (training/prepare: "a picture of a ...", "an emoji of ...",
# "a <subgroup> emoji: <name>", bare titles) and CLIP's usual one
CANDIDATES: tuple[str, ...] = (
    DEFAULT_TEMPLATE,
    "a picture of a {}.",
    "a drawing of a {}.",
    "an emoji of {}.",
    "a {} emoji.",
    "{}",
)


@dataclass
class TemplateChoice:
    """The chosen template and the mean train-part zero-shot accuracy of every candidate."""

    template: str
    scores: dict[str, float]  # candidate -> mean over tasks of the zero-shot accuracy on the train part
    per_task: dict[str, dict[str, float]]  # candidate -> task -> accuracy
    n_images: int  # train images the choice was made on

    def as_dict(self) -> dict:
        return {"template": self.template, "scores": self.scores, "per_task": self.per_task,
                "n_images": self.n_images, "measured_on": "the k-shot train images of every task (no test image)"}


def choose_template(towers: Towers, split: Split, candidates: tuple[str, ...] = CANDIDATES,
                    cache_dir: str | Path | None = None) -> TemplateChoice:
    """The candidate whose zero-shot accuracy on `split`'s TRAIN parts, averaged over tasks, is highest
    (ties: the earlier candidate). With `cache_dir`, the choice is stored there, keyed by the weights, the
    candidates and the train images, so a resumed `results` / `ship` does not measure it again."""
    key = hashlib.sha256(json.dumps([towers.backbone.fingerprint, list(candidates),
                                     {n: [[it.image, it.label] for it in t.train] for n, t in split.tasks.items()}],
                                    sort_keys=True).encode()).hexdigest()[:16]
    stored = Path(cache_dir) / f"template-{key}.json" if cache_dir is not None else None
    if stored is not None and stored.is_file():
        return TemplateChoice(**json.loads(stored.read_text()))
    train_only = Split(split.kind, split.root, split.config)
    for name, task in split.tasks.items():
        if not task.train:
            raise ValueError(f"task {name!r} has no train images to choose a template on")
        train_only.tasks[name] = replace(task, test=list(task.train))
    scores: dict[str, float] = {}
    per_task: dict[str, dict[str, float]] = {}
    for tpl in candidates:
        result = zero_shot(towers, train_only, template=tpl, cache_dir=cache_dir)
        per_task[tpl] = {name: r["accuracy"] for name, r in result.items()}
        scores[tpl] = sum(per_task[tpl].values()) / len(per_task[tpl])
    best = max(candidates, key=lambda t: (scores[t], -candidates.index(t)))
    choice = TemplateChoice(best, scores, per_task, sum(len(t.train) for t in split.tasks.values()))
    if stored is not None:
        atomic_write_bytes(stored, json.dumps(asdict(choice), indent=1).encode())
    return choice

