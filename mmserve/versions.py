"""Per-task operations on a registry store, each making a new version from the current one.

add (tasks, with their groups, from a training run's registry or another store; same name = replace), remove,
rollback, and the maintenance reads: list, history, verify, gc. A change is computed from the version it read and
committed with the store's compare-and-swap; when the caller did not pin a version (`expected`), a change that
lost the race is computed again from the new current version, a few times, before StaleVersionError reaches it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmserve.errors import RegistryError
from mmserve.features import FEATURES, feature_task
from mmserve.registry import BackboneRef, GroupEntry, Manifest, TaskEntry
from mmserve.store import HEAD, StaleVersionError, Store, blob_name, version_name
from mmserve.version_index import ENTRIES

ATTEMPTS = 8  # an unpinned change computed again after losing a race, at most this often


@dataclass(frozen=True)
class Change:
    """What one operation did to the store."""

    operation: str
    previous_version: str | None
    version: str
    sequence: int
    tasks: list[str] = field(default_factory=list)  # the tasks the operation added, replaced or removed

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"operation": self.operation, "previous_version": self.previous_version, "version": self.version,
                "sequence": self.sequence, "tasks": self.tasks}


def some(names: Sequence[str], limit: int = 20) -> str:
    """Names for a message: all of a few, the first `limit` of many (a store may hold thousands)."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def current(store: Store) -> Manifest:
    """The manifest of the store's current version; RegistryError for an empty store."""
    head = store.head()
    if head is None:
        raise RegistryError(f"{store.where(HEAD)}: the store is empty (add tasks first: mmserve registry add)")
    return store.get_version(head.version)


Check = Callable[[str], None]  # called with a written version before HEAD moves to it; raises to refuse it


def _commit(store: Store, base: str | None, manifest: Manifest, operation: str, tasks: list[str],
            check: Check | None) -> Change:
    store.put_version(manifest, base)  # blobs were written by the caller: version second, HEAD last
    if check is not None:
        check(manifest.version)  # e.g. a server builds it against its backbone: a bad version never becomes HEAD
    head = store.move_head(base, manifest.version, operation)
    return Change(operation, base, manifest.version, head.sequence, tasks)


def _retrying(store: Store, expected: str | None, make, check: Check | None) -> Change:
    """Run `make(base_version, base_manifest) -> (manifest, operation, tasks)` and commit it, again on a lost race
    when the caller pinned no version."""
    for attempt in range(ATTEMPTS):
        head = store.head()
        base = head.version if head else None
        if expected is not None and base != expected:
            raise StaleVersionError(f"{store.where(HEAD)}: the store is at version {base}, not {expected}; re-read "
                                    f"and try again")
        manifest = store.get_version(base) if base else None
        new, operation, tasks = make(manifest)
        try:
            return _commit(store, base, new, operation, tasks, check)
        except StaleVersionError:
            if expected is not None or attempt == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


# ---- add / remove / rollback -------------------------------------------------------------------------------


def _copy(manifest: Manifest) -> Manifest:
    """A manifest to change: its own lists (and group task lists); entries are replaced, never edited in place."""
    return replace(manifest, groups=[replace(g, tasks=list(g.tasks)) for g in manifest.groups],
                   tasks=list(manifest.tasks))


def _blank(backbone: BackboneRef) -> Manifest:
    return Manifest(backbone=copy.deepcopy(backbone), groups=[], tasks=[])


def _drop_task(manifest: Manifest, name: str) -> None:
    """Remove task `name` and its place in its group (a group left without tasks goes too)."""
    manifest.tasks = [t for t in manifest.tasks if t.name != name]
    for g in manifest.groups:
        g.tasks = [t for t in g.tasks if t != name]
    manifest.groups = [g for g in manifest.groups if g.tasks]


def add_tasks(store: Store, source: str | Path, names: Sequence[str] | None = None,
              expected: str | None = None, check: Check | None = None) -> Change:
    """Copy tasks (default: all) with their groups from `source` (a registry directory or another store) into
    `store`; a task of the same name is replaced. A source group is reused when the store holds the same group
    prompt, else added (renamed when its name is taken by another prompt)."""
    src = Store.open(source)
    src_manifest = current(src)
    chosen = list(names) if names else [t.name for t in src_manifest.tasks]
    known = {t.name: t for t in src_manifest.tasks}
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise RegistryError(f"{src.url}: no task(s) {unknown}; it has: {some(list(known))}")
    blobs = {}  # copy the bytes first: a version must never name a blob that is not there
    for name in chosen:
        task = known[name]
        blobs[task.sha256] = src.weights_bytes(task.weights, task.sha256, f"tasks[{name}]")
        if task.group is not None:
            group = src_manifest.group(task.group)
            blobs[group.sha256] = src.weights_bytes(group.weights, group.sha256, f"groups[{group.name}]")
            if group.grouping is not None:  # the group's grouping record travels with it
                rec = group.grouping
                blobs[rec["sha256"]] = src.weights_bytes(rec["weights"], rec["sha256"],
                                                         f"groups[{group.name}].grouping")
    for sha, data in blobs.items():
        if store.put_blob(data) != sha:
            raise RegistryError(f"{src.url}: a weights file changed while it was copied; try again")

    def make(base: Manifest | None):
        manifest = _copy(base) if base else _blank(src_manifest.backbone)
        if manifest.backbone.fingerprint != src_manifest.backbone.fingerprint:
            raise RegistryError(f"{src.url}: backbone.fingerprint: its tasks were trained on "
                                f"{src_manifest.backbone.model} ({src_manifest.backbone.fingerprint}), the store "
                                f"serves {manifest.backbone.model} ({manifest.backbone.fingerprint})")
        order = [t.name for t in manifest.tasks]
        for name in chosen:
            _drop_task(manifest, name)
            task = copy.deepcopy(known[name])
            task.weights = blob_name(task.sha256)
            if task.group is not None:
                task.group = _place_group(manifest, src_manifest.group(task.group)).name
                manifest.group(task.group).tasks.append(name)
            manifest.tasks.append(task)
        by_name = {t.name: t for t in manifest.tasks}
        manifest.tasks = [by_name[n] for n in order if n in by_name] + [by_name[n] for n in chosen if n not in order]
        return manifest, f"add {', '.join(chosen)} from {src.url}", chosen

    return _retrying(store, expected, make, check)


def _grouping_in_store(group: GroupEntry) -> dict | None:
    """A source group's grouping record as the store names it (its blob), or None."""
    if group.grouping is None:
        return None
    return {**copy.deepcopy(group.grouping), "weights": blob_name(group.grouping["sha256"])}


def _place_group(manifest: Manifest, group: GroupEntry) -> GroupEntry:
    """The store's group for a source group: the same prompt if there (taking the source's grouping record when it
    has one: the same group with one more task's gradient), else a new entry with a free name."""
    for g in manifest.groups:
        if g.sha256 == group.sha256 and g.prompt_config == group.prompt_config:
            if group.grouping is not None:
                g.grouping = _grouping_in_store(group)  # g is this version's own copy (_copy), never the base's
            return g
    taken = {g.name for g in manifest.groups}
    name = group.name if group.name not in taken else f"{group.name}-{group.sha256[:8]}"
    entry = GroupEntry(name, [], copy.deepcopy(group.prompt_config), group.trainable_params,
                       blob_name(group.sha256), group.sha256, _grouping_in_store(group))
    manifest.groups.append(entry)
    return entry


def remove_tasks(store: Store, names: Sequence[str], expected: str | None = None,
                 check: Check | None = None) -> Change:
    """A new version without tasks `names` (their groups shrink, empty groups go)."""
    if not names:
        raise RegistryError("remove: name at least one task")

    def make(base: Manifest | None):
        if base is None:
            raise RegistryError(f"{store.where(HEAD)}: the store is empty")
        known = [t.name for t in base.tasks]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RegistryError(f"{store.url}: no task(s) {unknown}; the current version has: {some(known)}")
        manifest = _copy(base)
        for name in names:
            _drop_task(manifest, name)
        if not manifest.tasks:
            raise RegistryError(f"{store.url}: removing {list(names)} would leave no task to serve")
        return manifest, f"remove {', '.join(names)}", list(names)

    return _retrying(store, expected, make, check)


def rollback(store: Store, version: str | None = None, expected: str | None = None,
             check: Check | None = None) -> Change:
    """Point the store back at `version` (default: the version before the current one) as a new history entry."""
    head = store.head()
    if head is None:
        raise RegistryError(f"{store.where(HEAD)}: the store is empty")
    if version is None:
        earlier = [h.version for h in head.history[:-1] if h.version != head.version]
        if not earlier:
            raise RegistryError(f"{store.where(HEAD)}: no earlier version to roll back to")
        version = earlier[-1]
    manifest = store.get_version(version, fresh=True)  # refuses a version that is not there (or was collected)
    if check is not None:
        check(version)
    pinned = head.version if expected is None else expected
    if pinned != head.version:
        raise StaleVersionError(f"{store.where(HEAD)}: the store is at version {head.version}, not {expected}")
    moved = store.move_head(pinned, manifest.version, f"rollback to {version}")
    return Change(f"rollback to {version}", pinned, version, moved.sequence, [t.name for t in manifest.tasks])


# ---- reads: list, history, verify, gc --------------------------------------------------------------------------


def task_blobs(manifest: Manifest, task: TaskEntry) -> dict[str, str]:
    """The sha256 of every blob a task uses: its own weights and its group's."""
    out = {"task": task.sha256}
    if task.group is not None:
        out["group"] = manifest.group(task.group).sha256
    return out


def listing(store: Store) -> dict[str, Any]:
    """The current version and each task with its group and the sha256 of every blob it uses."""
    head = store.head()
    manifest = current(store)
    return {"store": store.url, "version": manifest.version, "sequence": head.sequence if head else 0,
            "tasks": [{"name": t.name, "kind": t.kind, "group": t.group, "classes": len(t.classes),
                       "blobs": task_blobs(manifest, t)} for t in manifest.tasks]}


def history(store: Store) -> list[dict[str, Any]]:
    """HEAD's history, newest last."""
    head = store.head()
    return [] if head is None else [{"sequence": h.sequence, "version": h.version, "operation": h.operation,
                                     "created": h.created, "current": h.version == head.version
                                     and h.sequence == head.sequence} for h in head.history]


def verify(store: Store) -> list[str]:
    """Every problem found: each version file read strictly, each blob it names present with matching bytes."""
    problems: list[str] = []
    head = store.head()
    versions = [head.version] if store.legacy and head else [n.removesuffix(".json")
                                                              for n in store.list_names("versions")]
    if head is not None and head.version not in versions:
        problems.append(f"{store.where(HEAD)}: version {head.version} has no versions/{head.version}.json")
    checked: set[str] = set()
    for version in versions:
        try:
            manifest = store.get_version(version, fresh=True)
        except RegistryError as exc:
            problems.append(str(exc))
            continue
        entries = [(g.weights, g.sha256, f"groups[{g.name}]") for g in manifest.groups]
        entries += [(g.grouping["weights"], g.grouping["sha256"], f"groups[{g.name}].grouping")
                    for g in manifest.groups if g.grouping is not None]
        entries += [(t.weights, t.sha256, f"tasks[{t.name}]") for t in manifest.tasks]
        for rel, sha, where in entries:
            if (rel, sha) in checked:
                continue
            checked.add((rel, sha))
            try:
                store.weights_bytes(rel, sha, f"version {version}: {where}")
            except RegistryError as exc:
                problems.append(str(exc))
    return problems


def gc(store: Store, keep: int = 10) -> dict[str, Any]:
    """Keep the versions of the last `keep` history entries (the current one always); drop every other version
    file and every blob, task entry and stored feature no kept version uses."""
    if keep < 1:
        raise RegistryError("gc: --keep must be at least 1")
    head = store.head()
    if head is None or store.legacy:
        return {"kept_versions": [], "removed_versions": [], "removed_blobs": 0}
    kept = list(dict.fromkeys([h.version for h in head.history[-keep:]] + [head.version]))
    used: set[str] = set()
    entries: set[str] = set()  # entry files and packs (pack-<sha>) kept versions name
    for version in kept:
        parsed = store.parsed(version)
        manifest = parsed.manifest
        used |= {g.sha256 for g in manifest.groups} | {t.sha256 for t in manifest.tasks}
        used |= {g.grouping["sha256"] for g in manifest.groups if g.grouping is not None}
        entries |= set((parsed.shas or {}).values()) | {f"pack-{p}" for p in parsed.packs}
    removed_versions = [n.removesuffix(".json") for n in store.list_names("versions")
                        if n.removesuffix(".json") not in kept]
    for version in removed_versions:
        store.delete(version_name(version))
    removed = 0
    for name in store.list_names("blobs"):
        if name.removesuffix(".safetensors") not in used:
            store.delete(f"blobs/{name}")
            removed += 1
    for name in store.list_names(ENTRIES):
        if name.removesuffix(".jsonl").removesuffix(".json") not in entries:
            store.delete(f"{ENTRIES}/{name}")
    for fingerprint in store.list_names(FEATURES):
        for name in store.list_names(f"{FEATURES}/{fingerprint}"):
            if feature_task(name) not in used:
                store.delete(f"{FEATURES}/{fingerprint}/{name}")
    return {"kept_versions": kept, "removed_versions": removed_versions, "removed_blobs": removed}
