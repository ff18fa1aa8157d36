"""The rows of the accuracy table (methods), their constants, and what one invocation builds."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmserve.backbone import EMBEDDED_MODEL
from mmserve.prompts import methods
from training.config import DEFAULT_FUSE_RECIPE, DEVICE, FUSE_RECIPES, MODEL, PRETRAINED, RUN
from training.grouping import GROUP_EVERY, GROUP_STEPS
from training.options import Opt, option
from training.templates import AUTO, AUTO_TEMPLATE

COLOUR_STYLES = ("noto", "twemoji", "fluent_flat")
MONO_STYLES = ("openmoji_line", "fluent_mono")
FUSION_TASK = "emoji_subgroup"
RESULT = "result.json"
# options `results` and `ship` share
CACHE = Opt(help="prepared data (default $MMSERVE_CACHE, ~/.cache/mmserve)")
STYLES = Opt("--styles", help="subset of the styles (default: all prepared)")


HEAD_PSI = "a linear head on [prompted image feature ; psi] (`--head image+psi`, mmserve's first head)"
HEAD_IMAGE = "a linear head on the prompted image feature only (`--head image`, the paper's)"


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
    Method("mope-k4-clip", "fusion", "MoPE k=4, CLIP text, head on [image ; psi]",
           f"MoPE (l = 6, 4 experts) + {HEAD_PSI}, psi from CLIP text"),
    Method("mope-k16-clip", "fusion", "MoPE k=16, CLIP text, head on [image ; psi]",
           f"MoPE (l = 6, 16 experts) + {HEAD_PSI}, psi from CLIP text"),
    Method("mope-k4-minilm", "fusion", "MoPE k=4, MiniLM, head on [image ; psi]",
           f"MoPE (l = 6, 4 experts) + {HEAD_PSI}, psi from MiniLM"),
    Method("mope-k16-minilm", "fusion", "MoPE k=16, MiniLM, head on [image ; psi]",
           f"MoPE (l = 6, 16 experts) + {HEAD_PSI}, psi from MiniLM"),
    Method("mope-k16-clip-image", "fusion", "MoPE k=16, CLIP text, paper's head (image only)",
           f"MoPE (l = 6, 16 experts) + {HEAD_IMAGE}, psi from CLIP text"),
    Method("mope-k16-minilm-image", "fusion", "MoPE k=16, MiniLM, paper's head (image only)",
           f"MoPE (l = 6, 16 experts) + {HEAD_IMAGE}, psi from MiniLM"),
)
METHODS = {m.key: m for m in CLASSIFY_METHODS + FUSION_METHODS}
ZERO_SHOT = ("zero-shot", "fusion-zero-shot")
GROUPED = ("mmap-full", "mmap-group", "mmap-random")  # need the computed grouping of their (shots, seed)


@dataclass
class ResultsConfig:
    """What `mmserve-train results` builds; everything but shots, seeds, methods and budget keys the runs dir."""

    cache: str = option(opt=CACHE)  # the command line's default: $MMSERVE_CACHE or ~/.cache/mmserve
    pretrained: str | None = option(None, PRETRAINED)  # "none" = random init (tests)
    model: str = option(EMBEDDED_MODEL, MODEL)
    device: str = option("cpu", DEVICE)
    out: str = option("docs/results", help="output stem: <out>.md, <out>.json, <out>.png")
    runs_dir: str | None = option(None, help="one dir per run; finished runs are skipped "
                                             "(default <cache>/results/<model>-<weights>-<hash>)")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2])
    shots: list[int] = option(default_factory=lambda: [4, 16], help="train shots per class (and style)")
    methods: list[str] | None = option(None, help=lambda _: "subset of the rows to run (default all): "
                                       + " ".join(METHODS))
    tasks: list[str] | None = option(None, STYLES)  # None = classes.json's tasks
    epochs: int = option(5, help="classification epochs (MmAP: 5)")
    lr: float = option(0.0035, help="classification SGD lr (MmAP: 0.0035)")
    fuse_epochs: int = option(10, help="fusion epochs of the adamw-cosine-10 recipe (default 10; a --fuse-recipe "
                                           "other than that one sets its own)")
    fuse_recipe: str = option(DEFAULT_FUSE_RECIPE, choices=tuple(FUSE_RECIPES),
                              help=f"fusion recipe of the MoPE and linear rows (default {DEFAULT_FUSE_RECIPE}: what "
                                   "the published table used; mope-paper = 12 epochs, step decay after 2 and 5, "
                                   "RandAug)")
    group_steps: int = option(50, GROUP_STEPS)
    group_every: int = option(5, GROUP_EVERY)
    mope: dict = field(default_factory=dict)  # MoPEConfig overrides besides n_experts (tests: smaller)
    template: str = option(AUTO, AUTO_TEMPLATE)  # auto = training.templates.choose_template
    budget_minutes: float | None = option(None, help="start no new run after this many minutes")
    shipped: str | None = option(None, help="a ship report (models/ship.json): add its cell, trained with the shipped "
                                            "recipe, as reference rows (refused unless backbone weights, styles and "
                                            "template match)")
    restore: str | None = option(None, help="a published table (docs/results.json): seed the runs dir with its "
                                            "finished runs, so only missing ones run (refused unless the settings "
                                            "match and zero-shot measures the same here)")
    stop_on_error: bool = option(False, help="stop at the first failed run (default: go on)")
    progress: bool = option(True, RUN["progress"])
    command: str = ""
