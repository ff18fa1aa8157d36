"""Registry: save -> load round trip gives identical outputs; every corruption fails naming file and field."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmserve import registry as registry_mod
from mmserve.backbone import TINY_MODEL, BackboneSpec, load_backbone
from mmserve.builders import classify_prompt_module, fusion_module, load_classify_prompts, load_fusion, load_registry
from mmserve.complementary import ClipTextComplement
from mmserve.encoders import PromptedImageEncoder, PromptedTextEncoder
from mmserve.errors import RegistryError
from mmserve.fileio import atomic_write, sha256_file
from mmserve.prompts import MmAPConfig, count_params
from mmserve.prompts.mope import MoPEConfig
from mmserve.registry import (
    MANIFEST,
    BackboneRef,
    GroupEntry,
    Manifest,
    TaskEntry,
    content_version,
    read_manifest,
    save_registry,
)

MMAP = MmAPConfig(n_tokens=2, source_rows=1, source_cols=8).to_dict()


def _write(root: Path, backbone) -> dict:
    torch.manual_seed(0)
    group = classify_prompt_module(MMAP, backbone)
    t1, t2 = classify_prompt_module(MMAP, backbone), classify_prompt_module(MMAP, backbone)
    comp = ClipTextComplement(backbone)
    fuse = TaskEntry(name="pairs", kind="fuse", classes=["x", "y", "z"],
                     prompt_config=MoPEConfig(prompt_len=2, n_experts=4, mapper_hidden=16).to_dict(),
                     trainable_params=0, head="multiclass", complementary=comp.spec, psi_dim=comp.dim)
    fusion = fusion_module(fuse, backbone)
    fuse.trainable_params = count_params(fusion)
    manifest = Manifest(
        backbone=BackboneRef(backbone.spec.model, backbone.fingerprint),
        groups=[GroupEntry("colour", ["clipart", "photo"], MMAP, count_params(group))],
        tasks=[
            TaskEntry("clipart", "classify", ["cat", "dog"], MMAP, count_params(t1), group="colour"),
            TaskEntry("photo", "classify", ["cat", "dog"], MMAP, count_params(t2), group="colour",
                      metrics={"top1": 0.5}),
            fuse,
        ],
    )
    save_registry(root, manifest, {"colour": group.state_dict()},
                  {"clipart": t1.state_dict(), "photo": t2.state_dict(), "pairs": fusion.state_dict()})
    return {"group": group, "clipart": t1, "fusion": fusion, "comp": comp}


@pytest.fixture()
def saved(tmp_path, tiny_backbone):
    root = tmp_path / "reg"
    modules = _write(root, tiny_backbone)
    return root, modules


def test_round_trip_gives_identical_outputs(saved, tiny_backbone):
    root, modules = saved
    reg = load_registry(root, tiny_backbone)
    assert [t.name for t in reg.manifest.tasks] == ["clipart", "photo", "pairs"]
    assert reg.manifest.task("photo").metrics == {"top1": 0.5}
    image_enc, text_enc = PromptedImageEncoder(tiny_backbone), PromptedTextEncoder(tiny_backbone)
    images = torch.randn(2, 3, 32, 32)
    loaded = load_classify_prompts(reg, "clipart", tiny_backbone)()
    with torch.no_grad():
        original_v = torch.cat([modules["group"]().vision, modules["clipart"]().vision], dim=1)
        assert torch.equal(image_enc(images, loaded.vision), image_enc(images, original_v))
        tokens = text_enc.tokenize(["a cat."], n_prompt=4)
        original_t = torch.cat([modules["group"]().text, modules["clipart"]().text], dim=1)
        assert torch.equal(text_enc(tokens, loaded.text), text_enc(tokens, original_t))
        psi = modules["comp"].encode(["a cat", "a dog"])
        fusion = load_fusion(reg, "pairs", tiny_backbone)
        expected = modules["fusion"].eval()(image_enc, images, psi).logits
        assert torch.equal(fusion(image_enc, images, psi).logits, expected)


def test_version_changes_with_content_and_old_files_are_removed(saved, tiny_backbone):
    root, _ = saved
    first = read_manifest(root)
    reg = load_registry(root)
    manifest = reg.manifest
    manifest.task("photo").metrics = {"top1": 0.9}
    save_registry(root, manifest, reg.group_weights, reg.task_weights)
    second = read_manifest(root).version
    assert second != first.version
    reg.task_weights["photo"] = {k: v + 1 for k, v in reg.task_weights["photo"].items()}
    save_registry(root, manifest, reg.group_weights, reg.task_weights)
    assert read_manifest(root).version not in (first.version, second)  # new weights: a new content hash
    files = sorted(p.name for p in (root / "tasks").iterdir())
    assert len(files) == 3 and not any(f.startswith(".") for f in files)
    again = load_registry(root, tiny_backbone)
    assert all(torch.equal(again.task_weights["photo"][k], v) for k, v in reg.task_weights["photo"].items())


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST).read_text())
    edit(data)
    data["version"] = content_version(data)  # a consistent edit: the checks after the version check are tested
    (root / MANIFEST).write_text(json.dumps(data))


def _corrupt_tensor(root: Path, task: str, edit) -> None:
    data = json.loads((root / MANIFEST).read_text())
    entry = next(t for t in data["tasks"] if t["name"] == task)
    path = root / entry["weights"]
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    entry["sha256"] = sha256_file(path)
    data["version"] = content_version(data)
    (root / MANIFEST).write_text(json.dumps(data))


CORRUPTIONS = {
    "schema": (lambda r: _edit_manifest(r, lambda d: d.update(schema_version=99)), r"schema_version: unsupported"),
    "duplicate": (lambda r: _edit_manifest(r, lambda d: d["tasks"].append(dict(d["tasks"][0]))),
                  r"duplicate task name 'clipart'"),
    "unknown_field": (lambda r: _edit_manifest(r, lambda d: d["tasks"][0].update(colour="red")),
                      r"tasks\[0\]: unknown field\(s\) \['colour'\]"),
    "missing_field": (lambda r: _edit_manifest(r, lambda d: d["tasks"][1].pop("classes")),
                      r"tasks\[1\]: missing field\(s\) \['classes'\]"),
    "bad_kind": (lambda r: _edit_manifest(r, lambda d: d["tasks"][0].update(kind="detect")),
                 r"tasks\[clipart\]\.kind"),
    "unknown_group": (lambda r: _edit_manifest(r, lambda d: d["tasks"][0].update(group="mono")),
                      r"tasks\[clipart\]\.group: unknown group 'mono'"),
    "missing_file": (lambda r: next((r / "tasks").glob("photo-*")).unlink(),
                     r"tasks\[photo\]\.weights: file .* missing"),
    "sha": (lambda r: next((r / "groups").glob("*")).write_bytes(b"garbage"),
            r"sha256 does not match groups\[colour\]"),
    "missing_tensor": (lambda r: _corrupt_tensor(r, "clipart", lambda t: t.pop("source")),
                       r"clipart-.*safetensors: missing tensor\(s\) \['source'\]"),
    "wrong_shape": (lambda r: _corrupt_tensor(r, "photo", lambda t: t.update(source=torch.zeros(2, 1, 4))),
                    r"photo-.*safetensors: tensor 'source' has shape \(2, 1, 4\), the config needs \(2, 1, 8\)"),
    "fusion_shape": (lambda r: _corrupt_tensor(r, "pairs", lambda t: t.update({"head.bias": torch.zeros(5)})),
                     r"pairs-.*tensor 'head.bias' has shape \(5,\)"),
    "not_json": (lambda r: (r / MANIFEST).write_text("{"), r"manifest.json: invalid JSON"),
    "not_utf8": (lambda r: (r / MANIFEST).write_bytes(b"\xff\xfe\x00binary"), r"manifest.json: not UTF-8"),
    "classes_not_a_list": (lambda r: _edit_manifest(r, lambda d: d["tasks"][0].update(classes=5)),
                           r"tasks\[0\]\.classes: expected list\[str\], got 5"),
    "class_not_a_name": (lambda r: _edit_manifest(r, lambda d: d["tasks"][0].update(classes=["a", 1])),
                         r"tasks\[0\]\.classes: expected list\[str\]"),
    "groups_null": (lambda r: _edit_manifest(r, lambda d: d.update(groups=None)), r"groups: expected a list, got null"),
    "template_not_text": (lambda r: _edit_manifest(r, lambda d: d["tasks"][0].update(template=["{}"])),
                          r"tasks\[0\]\.template: expected str"),
    "prompt_config_not_object": (lambda r: _edit_manifest(r, lambda d: d["tasks"][0].update(prompt_config="x")),
                                 r"tasks\[0\]\.prompt_config: expected dict"),
    "prompt_value_not_a_number": (
        lambda r: _edit_manifest(r, lambda d: d["tasks"][0]["prompt_config"].update(n_tokens="four")),
        r"manifest.json: prompt_config: "),
    "params_bool": (lambda r: _edit_manifest(r, lambda d: d["groups"][0].update(trainable_params=True)),
                    r"groups\[0\]\.trainable_params: expected int, got true"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_raises_clear_error(saved, tiny_backbone, case):
    root, _ = saved
    corrupt, message = CORRUPTIONS[case]
    corrupt(root)
    with pytest.raises(RegistryError, match=message) as info:
        load_registry(root, tiny_backbone)
    assert str(root) in str(info.value)


def test_a_file_is_not_a_registry(tmp_path, tiny_backbone):
    path = tmp_path / "registry.json"
    path.write_text("{}")
    with pytest.raises(RegistryError, match=r"registry\.json/manifest\.json: unreadable .*registry directory"):
        load_registry(path, tiny_backbone)


def test_backbone_mismatch_is_refused(saved):
    root, _ = saved
    other = load_backbone(BackboneSpec(TINY_MODEL, seed=7))
    with pytest.raises(RegistryError, match=r"backbone.fingerprint: registry was trained on mmserve-tiny"):
        load_registry(root, other)


def test_failed_save_leaves_previous_registry_intact(saved, tiny_backbone, monkeypatch):
    root, _ = saved
    before = (root / MANIFEST).read_text()
    reg = load_registry(root)
    calls = {"n": 0}
    real_write = registry_mod.atomic_write_bytes

    def half_written(tmp: Path, data: bytes) -> None:
        tmp.write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    def failing_write(path, data):  # the second weights file fails half-way through its temp file
        calls["n"] += 1
        if calls["n"] == 2:
            return atomic_write(path, lambda tmp: half_written(tmp, data))
        return real_write(path, data)

    monkeypatch.setattr(registry_mod, "atomic_write_bytes", failing_write)
    changed = {k: {n: t + 1 for n, t in v.items()} for k, v in reg.task_weights.items()}
    with pytest.raises(OSError, match="disk full"):
        save_registry(root, reg.manifest, reg.group_weights, changed)
    assert (root / MANIFEST).read_text() == before
    assert not [p for p in root.rglob(".*") if p.is_file()]  # no temp files left behind
    load_registry(root, tiny_backbone)


def test_copy_of_registry_loads_elsewhere(saved, tmp_path, tiny_backbone):
    root, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    original = load_registry(root, tiny_backbone)
    shutil.rmtree(root)  # the copy must not point back at the original's files
    assert all(not Path(e.weights).is_absolute() for e in [*original.manifest.tasks, *original.manifest.groups])
    loaded = load_registry(copy, tiny_backbone)
    assert loaded.version == original.version
    assert all(torch.equal(loaded.task_weights[t][k], w) for t, ws in original.task_weights.items()
               for k, w in ws.items())


def test_a_path_with_a_nul_byte_is_a_registry_error(tmp_path, tiny_backbone):
    bad = f"{tmp_path}/reg\x00istry"
    for load in (read_manifest, lambda p: load_registry(p, tiny_backbone)):
        with pytest.raises(RegistryError, match="manifest.json: unreadable .*null byte") as info:
            load(bad)
        assert bad in str(info.value)


def test_a_hand_edited_manifest_with_a_stale_version_is_refused(saved, tiny_backbone):
    root, _ = saved
    data = json.loads((root / MANIFEST).read_text())
    stale = data["version"]
    data["tasks"][1]["metrics"] = {"top1": 0.99}  # edited, version left as it was
    (root / MANIFEST).write_text(json.dumps(data))
    expected = content_version(data)
    with pytest.raises(RegistryError, match=rf"manifest.json: version: the content hash is {expected}, the "
                                            rf"manifest says '{stale}'"):
        load_registry(root, tiny_backbone)


@pytest.mark.parametrize("threshold", [float("nan"), -0.1, 1.5])
def test_a_threshold_that_is_not_a_probability_is_refused(saved, tiny_backbone, threshold):
    root, _ = saved
    _edit_manifest(root, lambda d: d["tasks"][2].update(threshold=threshold))
    with pytest.raises(RegistryError, match=r"tasks\[pairs\]\.threshold: .* not a probability in \[0, 1\]"):
        load_registry(root, tiny_backbone)


def test_registry_files_get_the_umask_mode_not_the_temp_file_s_0600(saved, tmp_path):
    """A registry written by one account (a trainer) must be readable by another (the server): every file gets the
    mode open() would give it, not mkstemp's owner-only 0600."""
    import stat

    from mmserve.fileio import FILE_MODE, atomic_write_bytes

    root, _ = saved
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and (root / MANIFEST) in files
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {FILE_MODE}
    atomic_write_bytes(tmp_path / "report.md", b"x")
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == FILE_MODE
    mask = os.umask(0o022)
    os.umask(mask)
    assert FILE_MODE == 0o666 & ~mask  # with the usual umask 022: 0644, readable by the serving account
