"""Registry-store timings on the shipped backbone (an ad-hoc measurement until `mmserve bench --registry-scale`).

    python docs/registry_scale.py 1000

N random MmAP tasks of 55 classes (the shipped prompt shape) written through a local store; then: the first
engine's ready time (computes and stores every task's class text features), a second engine's (reads them),
one task added and one removed through the first engine (served there when the call returns), and the second
engine following each change with one poll.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

from mmserve.backbone import EMBEDDED_MODEL, BackboneSpec, load_backbone
from mmserve.bench.inputs import make_random_registry
from mmserve.engine import InferenceEngine
from mmserve.store import Store
from mmserve.versions import add_tasks

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "backbone" / f"{EMBEDDED_MODEL}.safetensors"


def timed(what: str, work):
    """Run `work`, print how long it took, return its result."""
    start = time.perf_counter()
    out = work()
    print(f"{what}: {time.perf_counter() - start:.2f} s", flush=True)
    return out


def main(n: int) -> None:
    """Measure a store of n tasks."""
    torch.set_num_threads(2)
    backbone = load_backbone(BackboneSpec(EMBEDDED_MODEL, str(CHECKPOINT)))
    tmp = Path(tempfile.mkdtemp())
    source = make_random_registry(tmp / "source", backbone, n + 1, n_classes=55)
    store = tmp / "store"
    names = [f"task{t:02d}" for t in range(n)]
    timed(f"registry add of {n} tasks", lambda: add_tasks(Store.open(store), source, names))
    first = timed("first engine ready (computes and stores the features)", lambda: InferenceEngine(backbone, store))
    second = timed("second engine ready (stored features)", lambda: InferenceEngine(backbone, store))
    timed("one task added, served by the engine that took the call",
          lambda: first.change("add", str(source), [f"task{n:02d}"]))
    timed("  the other engine follows (one poll)", second.poll)
    timed("one task removed, gone on the engine that took the call", lambda: first.change("remove", None, ["task00"]))
    timed("  the other engine follows (one poll)", second.poll)
    assert f"task{n:02d}" in second.snapshot.classify and "task00" not in second.snapshot.classify


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
