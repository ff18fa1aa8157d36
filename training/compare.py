"""Compare finished runs side by side (MmAP vs its ablations, MoPE encoders): one Markdown row per run dir."""

from __future__ import annotations

import json
from pathlib import Path

from training.metrics import primary_metric


def run_summary(run_dir: str | Path) -> dict:
    """Method, headline score, zero-shot reference, trainable parameters and per-task scores of one run."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        final = json.loads((run_dir / "metrics.json").read_text())["final"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{run_dir}: not a finished run ({exc})") from None
    if not final:
        raise ValueError(f"{run_dir}: the run has not finished (metrics.json has no final metrics)")
    tasks = final["tasks"]
    if "prompt" in config:  # classification run
        method = f"{config['prompt']['kind']} / {config['prompt']['sharing']}"
        grouping = config["grouping"]["mode"] if config["prompt"]["sharing"] != "task" else "-"
        metric, per_task = "accuracy", {k: v["accuracy"] for k, v in tasks.items()}
        zero = {k: v["zero_shot_accuracy"] for k, v in tasks.items()}
    else:  # fusion run
        method, grouping = f"mope / {config['complementary']}", "-"
        first = next(iter(tasks.values()))
        metric = primary_metric(first)[0]
        per_task = {k: v[metric] for k, v in tasks.items()}
        zero = {k: v[f"zero_shot_{metric}"] for k, v in tasks.items()}
    n = len(per_task)
    return {"run": str(run_dir), "method": method, "grouping": grouping, "metric": metric,
            "score": sum(per_task.values()) / n, "zero_shot": sum(zero.values()) / n,
            "trainable_params": final["trainable_params"], "tasks": per_task}


def compare_markdown(summaries: list[dict]) -> str:
    """A Markdown table: runs as rows, mean score, zero-shot, delta, parameters, then one column per task."""
    tasks = sorted({t for s in summaries for t in s["tasks"]})
    head = ["run", "method", "grouping", "metric", "score", "zero-shot", "delta", "trainable params", *tasks]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + " |"]
    for s in summaries:
        cells = [Path(s["run"]).name, s["method"], s["grouping"], s["metric"], f"{s['score']:.4f}",
                 f"{s['zero_shot']:.4f}", f"{s['score'] - s['zero_shot']:+.4f}", str(s["trainable_params"])]
        cells += [f"{s['tasks'][t]:.4f}" if t in s["tasks"] else "" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
