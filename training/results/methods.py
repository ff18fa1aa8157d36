"""The rows of the accuracy table (methods), their constants, and what one invocation builds."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmserve.backbone import EMBEDDED_MODEL
from mmserve.prompts import methods
from training.templates import AUTO

COLOUR_STYLES = ("noto", "twemoji", "fluent_flat")
MONO_STYLES = ("openmoji_line", "fluent_mono")
FUSION_TASK = "emoji_subgroup"
RESULT = "result.json"


@dataclass(frozen=True)
class Method:
    """One row of the table: its key (for --methods), family, label and what exactly it trains."""

    key: str
    family: str  # "classify" or "fusion"
    label: str
    definition: str
    prompt: str = "mmap"  # classify: the --prompt choice it trains
    sharing: str = "group+task"  # classify: group+task | task | group



def registered_rows() -> tuple[Method, ...]:
    """The rows registered prompt methods bring (mmserve.prompts.register_method(..., results=...))."""
    return tuple(Method(r.key, "classify", r.label, r.definition, r.choice, r.sharing)
                 for m in methods("classify") for r in m.results)


CLASSIFY_METHODS = (
    Method("zero-shot", "classify", "zero-shot",
           "each class name in the class-prompt template (Settings above) against the image, frozen backbone; "
           "nothing trained (the reference)"),
    *registered_rows(),  # text-only and visual-only (mmserve/prompts/deep.py), then any other method's
    Method("mmap-task", "classify", "MmAP task-specific only",
           "one MmAP per task (both towers), no group-shared prompt", sharing="task"),
    Method("mmap-group", "classify", "MmAP group-shared only",
           "one MmAP per computed group (the full method's groups), no task-specific prompt", sharing="group"),
    Method("mmap-full", "classify", "MmAP full (computed grouping)",
           "group-shared + task-specific MmAP, groups from gradient similarity (eq. 8), eq. 11/12 updates"),
    Method("mmap-random", "classify", "MmAP, random grouping",
           "as the full method, but a seeded random partition with as many groups as the computed one "
           "(2 when it found 1 or T)"),
    Method("mmap-all", "classify", "MmAP, all tasks in one group",
           "as the full method, one group holding every task"),
)
FUSION_METHODS = (
    Method("fusion-zero-shot", "fusion", "zero-shot (image vs class names)",
           "the image alone against the class names in the class-prompt template (Settings above); nothing trained"),
    Method("image-only", "fusion", "image-only (linear head on the image feature)",
           "a linear softmax head on the frozen CLIP image feature: MoPE's head without psi and without prompts"),
    Method("text-only-clip", "fusion", "text-only (linear head on psi, CLIP text)",
           "a linear softmax head on psi = the frozen CLIP text tower's feature of the CLDR name"),
    Method("text-only-minilm", "fusion", "text-only (linear head on psi, MiniLM)",
           "a linear softmax head on psi = all-MiniLM-L6-v2's feature of the CLDR name"),
    Method("mope-k4-clip", "fusion", "MoPE k=4, CLIP text", "MoPE (l = 6, 4 experts) + head, psi from CLIP text"),
    Method("mope-k16-clip", "fusion", "MoPE k=16, CLIP text", "MoPE (l = 6, 16 experts) + head, psi from CLIP text"),
    Method("mope-k4-minilm", "fusion", "MoPE k=4, MiniLM", "MoPE (l = 6, 4 experts) + head, psi from MiniLM"),
    Method("mope-k16-minilm", "fusion", "MoPE k=16, MiniLM", "MoPE (l = 6, 16 experts) + head, psi from MiniLM"),
)
METHODS = {m.key: m for m in CLASSIFY_METHODS + FUSION_METHODS}
ZERO_SHOT = ("zero-shot", "fusion-zero-shot")
GROUPED = ("mmap-full", "mmap-group", "mmap-random")  # need the computed grouping of their (shots, seed)


@dataclass
class ResultsConfig:
    """What `mmserve-train results` builds; everything but shots, seeds, methods and budget keys the runs dir."""

    cache: str
    pretrained: str | None = None  # checkpoint path or open_clip tag; "none" = random init (tests)
    model: str = EMBEDDED_MODEL
    device: str = "cpu"
    out: str = "docs/results"  # stem: <out>.md, <out>.json, <out>.png
    runs_dir: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shots: list[int] = field(default_factory=lambda: [4, 16])
    methods: list[str] | None = None  # None = every method
    tasks: list[str] | None = None  # styles (None = classes.json's tasks)
    epochs: int = 5  # classification (MmAP's 5)
    lr: float = 0.0035  # classification SGD lr (MmAP's 0.0035)
    fuse_epochs: int = 10  # fusion (MoPE trainer's default)
    group_steps: int = 50
    group_every: int = 5
    mope: dict = field(default_factory=dict)  # MoPEConfig overrides besides n_experts (tests: smaller)
    template: str = AUTO  # or a fixed class-prompt template; auto = training.templates.choose_template
    budget_minutes: float | None = None  # start no new run after this
    shipped: str | None = None  # a ship.json: its (shots, seed) cell, shipped recipe, added as reference rows
    restore: str | None = None  # a published <out>.json: its finished runs seed the runs dir (restore_published)
    stop_on_error: bool = False
    progress: bool = True
    command: str = ""
