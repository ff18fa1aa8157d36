"""add-task: the grouping record, a task joining a trained registry (directory and store), and its bad inputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmserve.backbone import TINY_MODEL, BackboneSpec, load_backbone
from mmserve.builders import load_registry
from mmserve.errors import RegistryError
from mmserve.fileio import sha256_file
from mmserve.registry import read_manifest
from mmserve.store import Store
from mmserve.versions import add_tasks, current, gc, verify
from training.add_task import AddTaskConfig, add_task
from training.cli import main
from training.config import BackboneConfig, OptimConfig, SplitConfig
from training.grouping import (
    GroupingConfig,
    GroupingRecord,
    center_offset,
    centered,
    join_gains,
    partition_score,
    similarity_matrix,
)
from training.mmap_trainer import MultiTaskConfig, train_multitask
from training.synthetic import write_image_task

SAME = {"red": "red", "blue": "blue"}
SWAPPED = {"red": "blue", "blue": "red"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Three tasks for the joint run (c's labels swapped), two newcomers, and one with an unreadable class."""
    root = tmp_path_factory.mktemp("add-task") / "data"
    for i, (task, classes) in enumerate((("a", SAME), ("b", SAME), ("c", SWAPPED), ("d", SAME), ("e", SWAPPED))):
        write_image_task(root, task, classes, 6, seed=i)
    write_image_task(root, "broken", SAME, 4, seed=9)
    for f in (root / "broken" / "blue").iterdir():
        f.write_bytes(b"not a png")
    return root


def _joint(root: Path, run_dir: Path, backbone, mode: str = "auto"):
    cfg = MultiTaskConfig(root=str(root), run_dir=str(run_dir), tasks=["a", "b", "c"],
                          backbone=BackboneConfig(TINY_MODEL), split=SplitConfig(shots=3, test_fraction=0.5),
                          optim=OptimConfig(epochs=1, batch_size=4, lr=0.05),
                          grouping=GroupingConfig(mode, steps=4, every=2), progress=False)
    return train_multitask(cfg, backbone)


@pytest.fixture(scope="module")
def joint(data_root: Path, tiny_backbone):
    """The joint run of a, b and c, grouped by gradients (with its grouping record)."""
    return _joint(data_root, data_root.parent / "joint", tiny_backbone)


def _config(data_root: Path, registry: Path, task: str, run_dir: Path, **changes) -> AddTaskConfig:
    cfg = AddTaskConfig(registry=str(registry), root=str(data_root), task=task, run_dir=str(run_dir),
                        split=SplitConfig(shots=3, test_fraction=0.5),
                        optim=OptimConfig(epochs=2, batch_size=4, lr=0.05), progress=False)
    return replace(cfg, **changes)


def _blobs(root: Path) -> dict[str, str]:
    """sha256 of every group's and task's weights in a directory registry, by entry."""
    m = read_manifest(root)
    return {**{f"group:{g.name}": g.sha256 for g in m.groups}, **{f"task:{t.name}": t.sha256 for t in m.tasks}}


def test_joint_run_keeps_the_grouping_record(joint, tiny_backbone):
    reg = joint.registry_dir
    manifest = read_manifest(reg)
    assert manifest.groups and all(g.grouping is not None for g in manifest.groups)
    load_registry(reg, tiny_backbone)  # the strict loader takes it
    seen = set()
    for g in manifest.groups:
        path = reg / g.grouping["weights"]
        assert sha256_file(path) == g.grouping["sha256"] and g.grouping["batches"] >= 1
        from safetensors.torch import load_file

        tensors = load_file(path)
        assert any(k.startswith("prompt.") for k in tensors)
        seen |= {k.removeprefix("gradient.") for k in tensors if k.startswith("gradient.")}
    assert seen == {"a", "b", "c"}


def test_join_gains_is_the_centred_partition_score():
    """Two agreeing tasks and one that conflicts: a newcomer like the first two gains with them, loses with the
    third, and each gain is the partition score with it minus the score without it."""
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    grads = {"a": e1, "b": e1 * 0.9 + 0.1 * e2, "c": -e1 + e2}
    record = GroupingRecord({}, {}, grads)
    groups = {"g0": ["a", "b"], "g1": ["c"]}
    new = e1 * 1.1
    gains = join_gains(record, groups, "d", new)
    assert gains["g0"] > 0 > gains["g1"]
    sim = similarity_matrix([grads["a"], grads["b"], grads["c"], new], "dot")
    scored = centered(sim, center_offset(sim))
    assert gains["g0"] == pytest.approx(partition_score(scored, [[0, 1, 3], [2]]) - partition_score(
        scored, [[0, 1], [2], [3]]))
    assert gains["g0"] == pytest.approx(scored[3][0] + scored[3][1])


def test_add_task_to_a_directory_leaves_every_other_blob(data_root, joint, tiny_backbone, tmp_path):
    reg = tmp_path / "registry"
    shutil.copytree(joint.registry_dir, reg)
    before, old_version = _blobs(reg), read_manifest(reg).version
    files = {p.relative_to(reg): sha256_file(p) for p in reg.rglob("*.safetensors")}
    result = add_task(_config(data_root, reg, "d", tmp_path / "run"), tiny_backbone)
    manifest = read_manifest(reg)
    assert manifest.version == result.version != old_version
    after = _blobs(reg)
    assert {k: after[k] for k in before} == before  # every other task's and group's weights, by hash
    for rel, sha in files.items():
        if not str(rel).startswith("grouping/") or (reg / rel).exists():
            assert sha256_file(reg / rel) == sha
    entry = manifest.task("d")
    joined = entry.metrics["joined"]
    assert set(joined["gains"]) == {g.name for g in read_manifest(joint.registry_dir).groups}
    best = max(joined["gains"].values())
    if best > 1e-12:
        assert not result.new_group and joined["gains"][result.group] == best
    else:
        assert result.new_group
    assert entry.group == result.group and "d" in manifest.group(result.group).tasks
    assert "gradient.d" in load_registry_record(reg, result.group)
    load_registry(reg, tiny_backbone)
    run_metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert run_metrics["final"]["tasks"]["d"]["joined"]["group"] == result.group
    assert 0.0 <= entry.metrics["accuracy"] <= 1.0 and len(run_metrics["epochs"]) == 2


def load_registry_record(reg: Path, group: str) -> dict:
    """The grouping record tensors of `group` in a directory registry."""
    from safetensors.torch import load_file

    return load_file(reg / read_manifest(reg).group(group).grouping["weights"])


def test_add_task_to_a_store_as_a_new_group(data_root, joint, tiny_backbone, tmp_path):
    store = Store.open(tmp_path / "store")
    add_tasks(store, joint.registry_dir)
    base = current(store)
    before = {**{g.name: g.sha256 for g in base.groups}, **{t.name: t.sha256 for t in base.tasks}}
    result = add_task(_config(data_root, tmp_path / "store", "e", tmp_path / "run", group="new"), tiny_backbone)
    assert result.new_group and result.gains is not None  # forced, but every gain still computed and recorded
    manifest = current(store)
    assert manifest.version == result.version
    now = {**{g.name: g.sha256 for g in manifest.groups}, **{t.name: t.sha256 for t in manifest.tasks}}
    assert {k: now[k] for k in before} == before
    new = manifest.group(result.group)
    assert new.tasks == ["e"] and new.grouping is not None and new.grouping["weights"].startswith("blobs/")
    assert manifest.task("e").metrics["joined"]["choice"] == "forced new"
    assert verify(store) == []
    gc(store, keep=1)
    assert verify(store) == []  # the grouping records' blobs are kept


def _unchanged(reg: Path):
    return (reg / "manifest.json").read_bytes()


def test_bad_inputs_are_refused_before_anything_is_written(data_root, joint, tiny_backbone, tmp_path):
    reg = tmp_path / "registry"
    shutil.copytree(joint.registry_dir, reg)
    manifest = _unchanged(reg)
    run = tmp_path / "run"
    other = load_backbone(BackboneSpec(TINY_MODEL, seed=1))
    with pytest.raises(RegistryError, match=r"manifest.json: backbone.fingerprint"):
        add_task(_config(data_root, reg, "d", run), other)
    with pytest.raises(RegistryError, match=r"tasks\[a\]: a task of this name exists; pass --replace"):
        add_task(_config(data_root, reg, "a", run), tiny_backbone)
    with pytest.raises(ValueError, match=r"broken/blue: a class folder without a readable image"):
        add_task(_config(data_root, reg, "broken", run), tiny_backbone)
    with pytest.raises(RegistryError, match=r"no group 'nope'"):
        add_task(_config(data_root, reg, "d", run, group="nope"), tiny_backbone)
    assert _unchanged(reg) == manifest and not run.exists()


def test_a_registry_without_the_record_needs_a_group(data_root, tiny_backbone, tmp_path):
    plain = _joint(data_root, tmp_path / "plain", tiny_backbone, mode="all")
    reg = plain.registry_dir
    assert all(g.grouping is None for g in read_manifest(reg).groups)
    manifest = _unchanged(reg)
    with pytest.raises(RegistryError, match=r"no grouping record; .*rerun the grouping.*--group NAME"):
        add_task(_config(data_root, reg, "d", tmp_path / "run"), tiny_backbone)
    assert _unchanged(reg) == manifest and not (tmp_path / "run").exists()
    group = read_manifest(reg).groups[0].name
    result = add_task(_config(data_root, reg, "d", tmp_path / "run", group=group), tiny_backbone)
    assert result.group == group and result.gains is None
    assert read_manifest(reg).group(group).tasks == ["a", "b", "c", "d"]


def test_cli_replace_and_one_line_errors(data_root, joint, tmp_path, capsys):
    reg = tmp_path / "registry"
    shutil.copytree(joint.registry_dir, reg)
    common = ["add-task", "--registry", str(reg), "--root", str(data_root), "--shots", "3", "--test-fraction", "0.5",
              "--epochs", "1", "--batch-size", "4", "--no-progress", "--run-dir", str(tmp_path / "run")]
    assert main([*common, "--task", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --replace" in err[0]
    before = _blobs(reg)
    assert main([*common, "--task", "b", "--replace"]) == 0
    out = capsys.readouterr().out
    assert "gain " in out and "b: joined" in out
    after = _blobs(reg)
    assert {k: v for k, v in after.items() if k != "task:b"} == {k: v for k, v in before.items() if k != "task:b"
                                                                and k in after}
    assert [t.name for t in read_manifest(reg).tasks].count("b") == 1
