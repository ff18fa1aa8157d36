"""docs/results.png: accuracy vs shots per method."""

from __future__ import annotations

import io
from pathlib import Path

from mmserve.fileio import atomic_write_bytes

from .methods import ZERO_SHOT


def plot(report: dict, path: Path) -> Path:
    """Accuracy vs shots per method (classification mean over styles; fusion over all styles), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, family, key, title in ((axes[0], "classify", "mean", "classification (mean over styles)"),
                                   (axes[1], "fusion", "all", "fusion (all styles)")):
        drawn = 0
        for m, meta in report["methods"].items():
            if meta["family"] != family:
                continue
            pts = [(c["shots"], c["mean"] if key == "mean" else c["scores"].get("all"))
                   for c in report["cells"] if c["method"] == m and "scores" in c]
            pts = [(x, v) for x, v in pts if v]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [100 * v["mean"] for _, v in pts]
            es = [100 * v["std"] for _, v in pts]
            if m in ZERO_SHOT:
                ax.axhline(ys[0], linestyle="--", color="grey", label=meta["label"])
            else:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=meta["label"])
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["shots"], [str(s) for s in report["shots"]])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path
