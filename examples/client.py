"""An mmserve client in a few lines: BentoML's own SyncHTTPClient for the APIs, httpx for GET /tasks.

Against a running server (`bentoml serve mmserve.service:MmServe`):

    python examples/client.py --url http://localhost:3000

It lists the tasks, classifies a picture with a task's classes and with your own labels (through the task's
prompts, then zero-shot), fuses it with a text, and embeds both. Tasks default to the first of each kind served.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import bentoml
import httpx

EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "examples" / "noto.png"


def ranked(predictions: list[dict[str, Any]]) -> str:
    """'tool 0.227, sport 0.201': labels with their scores, best first."""
    return ", ".join(f"{p['label']} {p['score']:.3f}" for p in predictions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:3000", help="the server (default: %(default)s)")
    parser.add_argument("--image", type=Path, default=EXAMPLE, help="a picture (default: models/examples/noto.png)")
    parser.add_argument("--text", default="hammer and wrench", help="the text to fuse and embed")
    parser.add_argument("--labels", default="a hammer,a red heart,a cat", help="comma-separated labels to rank")
    parser.add_argument("--task", help="a classification task (default: the first served)")
    parser.add_argument("--fuse-task", help="a fusion task (default: the first served)")
    args = parser.parse_args(argv)

    listing = httpx.get(f"{args.url}/tasks", timeout=60).raise_for_status().json()
    kinds = {kind: [t["name"] for t in listing["tasks"] if t["kind"] == kind] for kind in ("classify", "fuse")}
    print(f"registry {listing['registry_version']}: classify {', '.join(kinds['classify'])}; "
          f"fuse {', '.join(kinds['fuse'])}")
    task = args.task or kinds["classify"][0]
    fuse_task = args.fuse_task or kinds["fuse"][0]

    with bentoml.SyncHTTPClient(args.url, timeout=60) as client:
        answer = client.classify(image=args.image, task=task, top_k=3)
        print(f"classify {task}: {ranked(answer['top_k'])}")
        answer = client.classify(image=args.image, task=task, labels=args.labels, top_k=3)
        print(f"labels through {task}: {ranked(answer['top_k'])}")
        answer = client.classify(image=args.image, labels=args.labels, top_k=3)
        print(f"labels zero-shot: {ranked(answer['top_k'])}")
        answer = client.fuse(image=args.image, text=args.text, task=fuse_task)
        chosen = [{"label": answer["label"], "score": answer["score"]}] if answer["head"] == "multiclass" else \
            answer["labels"]
        print(f"fuse {fuse_task} {args.text!r} ({answer['head']}): {ranked(chosen) or '(no label above threshold)'}")
        answer = client.embed(image=args.image, text=args.text)
        image, text = answer["image_embedding"], answer["text_embedding"]
        cosine = sum(a * b for a, b in zip(image, text, strict=True))  # both are L2-normalised
        print(f"embed: {answer['dim']} dimensions, |image| {math.hypot(*image):.3f}, image . text {cosine:.3f}")


if __name__ == "__main__":
    main()
