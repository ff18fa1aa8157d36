"""The accuracy table of issue 5: every method on the five emoji styles and the fusion task, built resumably.

    mmserve-train results --cache ~/.cache/mmserve --pretrained CKPT --out docs/results \\
        --seeds 0 1 2 --shots 4 16 [--device cuda] [--methods ...] [--epochs N]

writes `<out>.md` (Markdown tables: the command, machine, wall time, and every cell still missing),
`<out>.json` (every number behind them) and `<out>.png` (accuracy vs shots per method).

Resumable: every (method, shots, seed) is one run directory under the runs dir, and a run whose `result.json`
exists is skipped, so the table can be built across sessions (`--budget-minutes` stops starting new runs; the
outputs are rewritten after every cell, so a lost machine loses only the cell in flight);
an interrupted trainer run resumes from its last epoch checkpoint. The runs dir defaults to
`<cache>/results/<model>-<backbone fingerprint>-<settings hash>`: other weights or other settings (epochs,
grouping steps, ...) start a fresh table instead of mixing numbers.

Splits (identical for every method; the test part never trains or tunes anything):
- classification: test = the held-out emoji identities of `tasks/heldout_emoji.json` (the same identities in
  every style); train = `shots` identities per class and style drawn with the seed from the train identities.
- fusion (image + CLDR name -> subgroup, all five styles in one task): test = `fusion/test.jsonl` (the same
  held-out identities); train = `shots` lines per class drawn with the seed from `fusion/train.jsonl`.

Modules: `methods` (the rows), `tasks` (the splits), `rundir` (the runs dir), `cells` (one run), `restore`
(from a published table), `build` (the command), `report`, `markdown` and `plot` (the outputs), `toy` (a test cache).
"""

from training.results.build import build_results, plan_cells
from training.results.cells import Context, run_cell, run_classify_zero_shot
from training.results.methods import (
    CLASSIFY_METHODS,
    COLOUR_STYLES,
    FUSION_METHODS,
    FUSION_TASK,
    METHODS,
    MONO_STYLES,
    ZERO_SHOT,
    Method,
    ResultsConfig,
)
from training.results.report import collect, shipped_rows, write_outputs
from training.results.restore import restore_published
from training.results.rundir import describe_machine, machine_info, resolve_runs_dir
from training.results.tasks import emoji_split, fusion_task_split, grouping_verdict, read_tasks, style_of
from training.results.toy import write_toy_cache

__all__ = ["CLASSIFY_METHODS", "COLOUR_STYLES", "FUSION_METHODS", "FUSION_TASK", "METHODS", "MONO_STYLES", "ZERO_SHOT",
           "Context", "Method", "ResultsConfig", "build_results", "collect", "describe_machine", "emoji_split",
           "fusion_task_split", "grouping_verdict", "machine_info", "plan_cells", "read_tasks", "resolve_runs_dir",
           "restore_published", "run_cell", "run_classify_zero_shot", "shipped_rows", "style_of", "write_outputs",
           "write_toy_cache"]
