"""The registry store: per-task versions (add, remove, rollback, verify, gc), compare-and-swap, crashes between
writes, stored text features and incremental snapshots, on a local path and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _registry_fixture import color_image
from safetensors.torch import load_file, save_file

from mmserve.engine import InferenceEngine
from mmserve.errors import RegistryError
from mmserve.features import FEATURES
from mmserve.fileio import sha256_file
from mmserve.registry import content_version, seal_manifest
from mmserve.store import StaleVersionError, Store, forget_parsed
from mmserve.version_index import ENTRIES
from mmserve.versions import add_tasks, current, gc, history, listing, remove_tasks, rollback, verify


def _names(store: Store) -> list[str]:
    return [t["name"] for t in listing(store)["tasks"]]


def test_add_remove_rollback_make_versions_that_share_blobs(tmp_path: Path, demo_registries) -> None:
    store = Store.open(tmp_path / "store")
    first = add_tasks(store, demo_registries.v1)
    assert first.previous_version is None and first.sequence == 1
    assert _names(store) == ["colors", "warmth", "brightness", "tags", "pet"]
    blobs_before = set(store.list_names("blobs"))
    removed = remove_tasks(store, ["warmth"])
    assert _names(store) == ["colors", "brightness", "tags", "pet"] and removed.previous_version == first.version
    assert set(store.list_names("blobs")) == blobs_before  # a version is a manifest: no blob rewritten
    replaced = add_tasks(store, demo_registries.v2, ["colors"])  # same name: replaced in place, its group shared
    listed = {t["name"]: t for t in listing(store)["tasks"]}
    assert list(listed) == ["colors", "brightness", "tags", "pet"]
    v1 = current(Store.open(demo_registries.v1))
    assert listed["colors"]["blobs"]["task"] != v1.task("colors").sha256  # v2's retrained colors
    assert listed["colors"]["blobs"]["group"] == v1.group("synthetic").sha256  # the same group prompt, reused
    assert listed["tags"]["blobs"] == {"task": v1.task("tags").sha256}  # untouched tasks keep their blobs
    back = rollback(store)
    assert back.version == removed.version and _names(store) == ["colors", "brightness", "tags", "pet"]
    assert [h["operation"].split()[0] for h in history(store)] == ["add", "remove", "add", "rollback"]
    assert history(store)[-1]["current"] and replaced.sequence == 3
    with pytest.raises(RegistryError, match=r"no task\(s\) \['nope'\]"):
        remove_tasks(store, ["nope"])
    with pytest.raises(RegistryError, match="no task to serve"):
        remove_tasks(store, _names(store))


def test_a_stale_write_gets_a_clear_conflict(tmp_path: Path, demo_registries) -> None:
    store = Store.open(tmp_path / "store")
    base = add_tasks(store, demo_registries.v1).version
    remove_tasks(store, ["pet"], expected=base)
    with pytest.raises(StaleVersionError, match=f"not {base}"):
        remove_tasks(store, ["tags"], expected=base)  # based on a version that is no longer current
    with pytest.raises(StaleVersionError, match="moved"):
        store.move_head(base, base, "by hand")
    assert "tags" in _names(store)


def _worker(store_url: str, source: str, ops: list[tuple[str, str]], out: multiprocessing.Queue) -> None:
    store = Store.open(store_url)
    for op, name in ops:
        change = (add_tasks(store, source, [name]) if op == "add" else remove_tasks(store, [name]))
        out.put((op, name, change.sequence))


def test_concurrent_writers_from_two_processes_lose_nothing(tmp_path: Path, demo_registries) -> None:
    """20 add/remove operations from 2 processes: each lands (a lost race is recomputed), in one serial order."""
    url = str(tmp_path / "store")
    add_tasks(Store.open(url), demo_registries.v1, ["colors"])
    src = str(demo_registries.v1)
    plans = [[("add", "warmth"), ("remove", "warmth")] * 5, [("add", "tags"), ("remove", "tags")] * 4
             + [("add", "tags"), ("add", "pet")]]
    out: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    procs = [multiprocessing.get_context("fork").Process(target=_worker, args=(url, src, p, out)) for p in plans]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    done = sorted(out.get(timeout=5) for _ in range(20))
    assert sorted(seq for *_, seq in done) == list(range(2, 22))  # 20 distinct moves of HEAD after the first
    assert sorted(_names(Store.open(url))) == ["colors", "pet", "tags"]  # each process's last word stands
    assert verify(Store.open(url)) == []


def _killed_at(point: str, n: int, store_url: str, source: str) -> None:
    """In a forked child: add `source`'s tasks, dying (no cleanup at all) at the n-th call of Store.`point`."""
    calls = {"n": 0}
    original = getattr(Store, point)

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os._exit(9)  # killed between two writes: nothing after this runs
        return original(self, *args, **kwargs)

    setattr(Store, point, dying)
    add_tasks(Store.open(store_url), source)
    os._exit(0)


@pytest.mark.parametrize(("point", "n"), [("put_blob", 1), ("put_blob", 3), ("put_version", 1), ("move_head", 1)])
def test_a_writer_killed_between_writes_leaves_a_servable_version(tmp_path: Path, demo_registries, point: str,
                                                                 n: int) -> None:
    url = tmp_path / "store"
    before = add_tasks(Store.open(url), demo_registries.v1, ["colors", "warmth"]).version
    child = multiprocessing.get_context("fork").Process(target=_killed_at,
                                                        args=(point, n, str(url), str(demo_registries.v2)))
    child.start()
    child.join(120)
    assert child.exitcode == 9
    store = Store.open(url)
    assert store.head().version == before  # HEAD never moved: the old version serves, complete
    assert verify(store) == []
    add_tasks(store, demo_registries.v2)  # and the next writer succeeds over what was left behind
    assert verify(store) == []


def test_verify_names_a_corrupt_blob_and_a_missing_one(tmp_path: Path, demo_registries) -> None:
    store = Store.open(tmp_path / "store")
    add_tasks(store, demo_registries.v1)
    entry = store.get_version(store.head().version).task("colors")
    blob = tmp_path / "store" / entry.weights
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    other = store.get_version(store.head().version).task("pet")
    (tmp_path / "store" / other.weights).unlink()
    problems = verify(store)
    assert any(entry.sha256 in p and "do not match their sha256" in p for p in problems), problems
    assert any(other.sha256 in p and "missing" in p for p in problems), problems


def test_gc_keeps_what_kept_versions_use(tmp_path: Path, demo_registries) -> None:
    store = Store.open(tmp_path / "store")
    add_tasks(store, demo_registries.v1)
    add_tasks(store, demo_registries.v2, ["colors"])
    remove_tasks(store, ["pet"])
    report = gc(store, keep=1)
    assert report["kept_versions"] == [store.head().version] and len(report["removed_versions"]) == 2
    assert report["removed_blobs"] == 2  # v1's colors and pet
    assert verify(store) == []
    with pytest.raises(RegistryError, match="missing"):
        rollback(store, report["removed_versions"][0])


def test_a_change_writes_one_entry_and_an_index_and_a_corrupt_entry_is_named(tmp_path: Path,
                                                                             demo_registries) -> None:
    store = Store.open(tmp_path / "store")
    add_tasks(store, demo_registries.v1)
    entries = tmp_path / "store" / ENTRIES
    before = set(entries.iterdir())
    assert len(before) == 5  # one per task
    add_tasks(store, demo_registries.v2, ["colors"])
    (fresh,) = set(entries.iterdir()) - before  # the changed task's entry; the other four are the index's names
    index = json.loads((tmp_path / "store" / "versions" / f"{store.head().version}.json").read_bytes())
    assert len(index["tasks"]) == 5 and [n for n, sha in index["tasks"] if f"{sha}.json" == fresh.name] == ["colors"]
    forget_parsed()  # as another process: read from the files
    assert Store.open(tmp_path / "store").get_version(store.head().version).task("colors").sha256 == current(
        Store.open(demo_registries.v2)).task("colors").sha256
    good = fresh.read_bytes()
    fresh.write_bytes(good.replace(b'"colors"', b'"colour"'))
    forget_parsed()
    with pytest.raises(RegistryError, match=rf"entries/{fresh.stem}.json: tasks\[colors\]: bytes do not match"):
        Store.open(tmp_path / "store").get_version(store.head().version)
    assert any(fresh.stem in p for p in verify(store))
    fresh.write_bytes(good)
    report = gc(store, keep=1)
    assert len(report["removed_versions"]) == 1 and fresh in set(entries.iterdir())  # kept: the current one uses it
    assert len(set(entries.iterdir())) == 5  # v1's colors entry went with the version that used it


def test_many_new_entries_go_in_one_pack_and_a_few_beside_it(tmp_path: Path, demo_registries, monkeypatch) -> None:
    monkeypatch.setattr("mmserve.version_index.REPACK_MIN", 2)  # 5 tasks stand for thousands
    store = Store.open(tmp_path / "store")
    add_tasks(store, demo_registries.v1)
    entries = tmp_path / "store" / ENTRIES
    (pack,) = entries.iterdir()
    assert pack.name.startswith("pack-") and len(pack.read_bytes().splitlines()) == 5
    add_tasks(store, demo_registries.v2, ["colors"])  # 1 new entry of 5: beside the pack, which the index keeps
    (loose,) = set(entries.iterdir()) - {pack}
    assert loose.suffix == ".json"
    forget_parsed()
    fresh = Store.open(tmp_path / "store").get_version(store.head().version)
    assert [t.name for t in fresh.tasks] == ["colors", "warmth", "brightness", "tags", "pet"]
    assert fresh.task("colors").sha256 == current(Store.open(demo_registries.v2)).task("colors").sha256
    good = pack.read_bytes()
    pack.write_bytes(good.replace(b'"warmth"', b'"w4rmth"'))
    forget_parsed()
    with pytest.raises(RegistryError, match=rf"{pack.name}: bytes do not match"):
        Store.open(tmp_path / "store").get_version(store.head().version)
    pack.write_bytes(good)
    assert gc(store, keep=1)["removed_versions"] and set(entries.iterdir()) == {pack, loose}  # both still named
    assert verify(store) == []


def test_a_version_holding_a_whole_manifest_still_reads(tmp_path: Path, demo_registries) -> None:
    """The first store layout wrote each version as a whole manifest; such a store serves and changes on."""
    manifest = current(Store.open(demo_registries.v1))
    old = replace(manifest, groups=list(manifest.groups), tasks=list(manifest.tasks))
    for entry in old.tasks + old.groups:
        entry.weights = f"blobs/{entry.sha256}.safetensors"
    payload = seal_manifest(old, indent=None)
    root = tmp_path / "store"
    for sub in ("blobs", "versions"):
        (root / sub).mkdir(parents=True)
    for path in (demo_registries.v1 / "groups").iterdir():
        shutil.copy(path, root / "blobs" / f"{sha256_file(path)}.safetensors")
    for path in (demo_registries.v1 / "tasks").iterdir():
        shutil.copy(path, root / "blobs" / f"{sha256_file(path)}.safetensors")
    (root / "versions" / f"{old.version}.json").write_bytes(payload)
    store = Store.open(root)
    store.move_head(None, old.version, "written by the first layout")
    assert _names(store) == ["colors", "warmth", "brightness", "tags", "pet"] and verify(store) == []
    removed = remove_tasks(store, ["pet"])
    assert _names(store) == ["colors", "warmth", "brightness", "tags"] and removed.previous_version == old.version


def test_a_legacy_directory_reads_as_a_one_version_store(demo_registries) -> None:
    store = Store.open(demo_registries.v1)
    assert store.legacy and store.head().sequence == 0 and verify(store) == []
    with pytest.raises(RegistryError, match="copy it into a store first"):
        remove_tasks(store, ["pet"])


# ---- the engine on a store ------------------------------------------------------------------------------------


def _count_text_tower(engine: InferenceEngine, monkeypatch) -> list[int]:
    calls: list[int] = []
    encoder = engine.text_encoder
    original = type(encoder).forward
    monkeypatch.setattr(type(encoder), "forward", lambda self, tokens, prompts=None, normalize=True: (
        calls.append(tokens.shape[0]), original(self, tokens, prompts, normalize))[1])
    return calls


def test_engine_builds_only_changed_tasks_and_stores_their_features(tmp_path: Path, demo_registries, tiny_backbone,
                                                                     monkeypatch) -> None:
    url = tmp_path / "store"
    add_tasks(Store.open(url), demo_registries.v1)
    engine = InferenceEngine(tiny_backbone, url)
    features = tmp_path / "store" / FEATURES / tiny_backbone.fingerprint
    assert len(list(features.iterdir())) == 3  # the three classification tasks', computed once, kept
    rng = np.random.default_rng(0)
    image = torch.stack([tiny_backbone.preprocess(color_image("red", rng))])
    assert engine.classify(image, ["colors"])[0].label == "red"
    calls = _count_text_tower(engine, monkeypatch)
    fresh = InferenceEngine(tiny_backbone, url)  # another worker: every feature read from the store
    assert calls == [] and fresh.classify(image, ["colors"])[0].label == "red"
    add_tasks(Store.open(url), demo_registries.v2, ["colors"])
    assert engine.poll().changed and engine._builder.rebuilt == 1  # only colors was built again
    assert calls == [3]  # its 3 classes through the text tower, once
    assert engine.classify(image, ["colors"])[0].label == "crimson"
    assert engine.poll() is None  # nothing moved since


def test_a_features_file_of_another_backbone_is_refused_naming_it(tmp_path: Path, demo_registries,
                                                                  tiny_backbone) -> None:
    url = tmp_path / "store"
    add_tasks(Store.open(url), demo_registries.v1)
    engine = InferenceEngine(tiny_backbone, url)
    folder = tmp_path / "store" / FEATURES / tiny_backbone.fingerprint
    victim = sorted(folder.iterdir())[0]
    other = sorted(folder.iterdir())[1]
    shutil.copy(other, victim)  # another task's features under this task's name
    with pytest.raises(RegistryError, match=rf"{victim.name}: fingerprint: made for backbone"):
        InferenceEngine(tiny_backbone, url)
    assert engine.snapshot.version == Store.open(url).head().version  # the engine already serving keeps serving


def test_engine_change_checks_the_version_before_it_becomes_current(tmp_path: Path, demo_registries, tiny_backbone,
                                                                   monkeypatch) -> None:
    url = tmp_path / "store"
    add_tasks(Store.open(url), demo_registries.v1, ["colors", "warmth"])
    engine = InferenceEngine(tiny_backbone, url)
    before = engine.snapshot.version
    bad = tmp_path / "bad"
    shutil.copytree(demo_registries.v1, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    brightness = next(t for t in manifest["tasks"] if t["name"] == "brightness")
    tensors = bad / brightness["weights"]
    weights = {k: v[:, :1].contiguous() for k, v in load_file(tensors).items()}  # a shape its config cannot make
    save_file(weights, tensors)
    brightness["sha256"] = sha256_file(tensors)
    manifest["version"] = content_version(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="has shape"):
        engine.change("add", str(bad), ["brightness"])
    assert Store.open(url).head().version == before and engine.snapshot.version == before
    done, served = engine.change("add", str(demo_registries.v1), ["brightness"])
    assert served.version == done.version == Store.open(url).head().version
    assert "brightness" in engine.snapshot.classify


# ---- on a real S3 server ----------------------------------------------------------------------------------------


def test_the_store_on_s3_with_compare_and_swap(s3, demo_registries, tiny_backbone) -> None:
    url = s3.bucket("mmserve-store") + "/registry"
    store = Store.open(url)
    assert not store.legacy and store.head() is None
    first = add_tasks(store, demo_registries.v1)
    engine = InferenceEngine(tiny_backbone, url)
    assert engine.snapshot.version == first.version and set(engine.snapshot.classify) == {"colors", "warmth",
                                                                                         "brightness"}
    with pytest.raises(StaleVersionError):
        store.move_head(None, first.version, "as if the store were empty")  # If-None-Match refuses
    moved = remove_tasks(store, ["pet"], expected=first.version)
    with pytest.raises(StaleVersionError):
        remove_tasks(store, ["tags"], expected=first.version)  # If-Match on HEAD's old ETag refuses
    assert engine.poll().version == moved.version and "pet" not in engine.snapshot.fusion
    assert verify(store) == [] and Store.open(url).head().version == moved.version


def test_a_store_that_stops_answering_leaves_the_last_version_serving(s3, demo_registries, tiny_backbone,
                                                                      monkeypatch) -> None:
    url = s3.bucket("mmserve-flaky") + "/registry"
    add_tasks(Store.open(url), demo_registries.v1, ["colors"])
    engine = InferenceEngine(tiny_backbone, url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the store's endpoint stops answering
    assert engine.poll() is None and "store unreachable" in engine.store_error
    assert engine.describe()["store"]["reachable"] is False  # /readyz says not ready (MmServeEngine.__is_ready__)
    image = torch.stack([tiny_backbone.preprocess(color_image("red", np.random.default_rng(0)))])
    assert engine.classify(image, ["colors"])[0].label == "red"  # the last good version keeps serving
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert engine.poll() is None and engine.store_error is None


def test_an_unreachable_store_is_one_line_naming_the_url(tiny_backbone, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(RegistryError, match=r"^s3://nowhere/registry: store unreachable"):
        InferenceEngine(tiny_backbone, "s3://nowhere/registry")


def test_the_registry_command(tmp_path: Path, demo_registries, capsys) -> None:
    """`mmserve registry add | remove | list --json | history | rollback | verify | gc` on a local store."""
    from mmserve.cli import main

    store = str(tmp_path / "store")
    assert main(["registry", "add", store, str(demo_registries.v1), "--task", "colors", "--task", "pet"]) == 0
    assert main(["registry", "add", store, str(demo_registries.v1), "--task", "warmth"]) == 0
    assert main(["registry", "remove", store, "pet"]) == 0
    capsys.readouterr()
    assert main(["registry", "list", store, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in listed["tasks"]] == ["colors", "warmth"] and listed["sequence"] == 3
    assert listed["tasks"][0]["blobs"]["group"] == listed["tasks"][1]["blobs"]["group"]  # one shared group
    assert main(["registry", "history", store]) == 0
    assert "remove pet  (current)" in capsys.readouterr().out
    assert main(["registry", "rollback", store, "--expect", "000000000000"]) == 2  # stale: one line, exit 2
    assert "not 000000000000" in capsys.readouterr().err
    assert main(["registry", "rollback", store]) == 0 and main(["registry", "verify", store]) == 0
    assert main(["registry", "gc", store, "--keep", "1"]) == 0
    assert "removed 2 version(s)" in capsys.readouterr().out
    blob = next((tmp_path / "store" / "blobs").iterdir())
    blob.write_bytes(b"not the bytes")
    assert main(["registry", "verify", store]) == 1
    assert blob.name.removesuffix(".safetensors") in capsys.readouterr().err
