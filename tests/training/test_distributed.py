"""torchrun: two CPU processes (gloo) train what one process trains, and ranks that see different data are refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmserve.backbone import TINY_MODEL
from mmserve.registry import read_manifest
from training.cli import main
from training.synthetic import write_fusion_jsonl, write_image_task

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node 2` on a free rendezvous port, 1 thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two tiny tasks and their split file."""
    base = tmp_path_factory.mktemp("ddp")
    for i, task in enumerate(("clipart", "sketch")):
        write_image_task(base / "data", task, {"red": "red", "blue": "blue"}, 8, seed=i)
    assert main(["split", "--root", str(base / "data"), "--out", str(base / "split.json"), "--shots", "4"]) == 0
    return base


def _classify(data: Path, run_dir: Path, split: str = "split.json") -> list[str]:
    return ["classify", "--split", str(data / split), "--run-dir", str(run_dir), "--model", TINY_MODEL,
            "--pretrained", "none", "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--group-steps", "4",
            "--group-every", "2", "--no-progress"]


def _tensors(registry: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(registry.rglob("*.safetensors")):
        for key, value in load_file(path).items():
            out[f"{path.parent.name}/{path.name.rsplit('-', 1)[0]}:{key}"] = value
    return out


def test_two_processes_train_what_one_does(data: Path):
    assert main(_classify(data, data / "one")) == 0
    done = _torchrun(["-m", "training.cli", *_classify(data, data / "two")], data)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _tensors(data / "one" / "registry"), _tensors(data / "two" / "registry")
    assert one.keys() == two.keys() and any(k.startswith("grouping/") for k in one)  # the record too
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=0), (key, (one[key] - two[key]).abs().max())
    assert [g.tasks for g in read_manifest(data / "one" / "registry").groups] == [
        g.tasks for g in read_manifest(data / "two" / "registry").groups]
    config = (data / "two" / "config.json").read_text()
    assert '"world_size": 2' in config


def test_ranks_that_see_different_data_are_refused(data: Path):
    other = data / "split-1.json"
    assert main(["split", "--root", str(data / "data"), "--out", str(other), "--shots", "3"]) == 0
    launcher = data / "launch.py"
    launcher.write_text(
        "import os, sys\nfrom training.cli import main\n"
        f"args = {_classify(data, data / 'bad')!r}\n"
        "if os.environ['RANK'] == '1':\n    args[2] = args[2].replace('split.json', 'split-1.json')\n"
        "sys.exit(main(args))\n")
    done = _torchrun([str(launcher)], data)
    assert done.returncode != 0
    assert "see different data than rank 0" in done.stderr
    assert not (data / "bad" / "registry").exists()


def _add_task(data: Path, registry: Path, run_dir: Path, split: Path | None = None) -> list[str]:
    return ["add-task", "--registry", str(registry), "--root", str(data / "newcomer"), "--task", "paint",
            "--shots", "4", "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--run-dir", str(run_dir),
            "--no-progress", *(["--split", str(split)] if split else [])]


def test_add_task_under_torchrun_equals_one_process(data: Path):
    write_image_task(data / "newcomer", "paint", {"red": "red", "blue": "blue"}, 8, seed=7)
    assert main(_classify(data, data / "joint")) == 0
    one, two = data / "add-one-registry", data / "add-two-registry"
    shutil.copytree(data / "joint" / "registry", one)
    shutil.copytree(data / "joint" / "registry", two)
    assert main(_add_task(data, one, data / "add-one")) == 0
    done = _torchrun(["-m", "training.cli", *_add_task(data, two, data / "add-two", data / "add-one" / "split.json")],
                     data)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("joined") == 1  # one rank reports (and writes)
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys() and any("paint" in k for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (key, (a[key] - b[key]).abs().max())
    got = {t.name: t.group for t in read_manifest(two).tasks}
    assert got == {t.name: t.group for t in read_manifest(one).tasks} and "paint" in got


def _fuse(data: Path, run_dir: Path) -> list[str]:
    return ["fuse", "--train", str(data / "fuse.jsonl"), "--test", str(data / "fuse_test.jsonl"), "--run-dir",
            str(run_dir), "--model", TINY_MODEL, "--pretrained", "none", "--complementary", "clip", "--epochs", "2",
            "--batch-size", "8", "--lr", "0.01", "--experts", "4", "--prompt-len", "2", "--randaug",
            "--importance-weight", "1.0", "--no-progress"]


def test_fuse_under_torchrun_equals_one_process(data: Path):
    """Router noise, RandAug and the importance loss (a whole-batch statistic) included."""
    write_fusion_jsonl(data / "fuse.jsonl", 16, seed=1)
    write_fusion_jsonl(data / "fuse_test.jsonl", 8, seed=2)
    assert main(_fuse(data, data / "fuse-one")) == 0
    done = _torchrun(["-m", "training.cli", *_fuse(data, data / "fuse-two")], data)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _tensors(data / "fuse-one" / "registry"), _tensors(data / "fuse-two" / "registry")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (key, (a[key] - b[key]).abs().max())
    one = json.loads((data / "fuse-one" / "metrics.json").read_text())["epochs"][-1]
    two = json.loads((data / "fuse-two" / "metrics.json").read_text())["epochs"][-1]
    for key in ("train_loss", "train_importance_loss", "train_accuracy", "train_routing_entropy"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_a_ranks_rows_are_its_tensor_split_part():
    from training.distributed import World

    for n in range(1, 12):
        for size in (2, 3, 4):
            parts = torch.tensor_split(torch.arange(n), size)
            for rank in range(size):
                assert torch.equal(torch.arange(n)[World(rank, size).rows(n)], parts[rank]), (n, size, rank)
