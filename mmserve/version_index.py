"""A store version as an index naming one content-addressed blob per task entry.

    <store>/entries/<sha256>.json     one task's manifest entry (compact JSON, keys sorted)
    <store>/versions/<version>.json   {"format", "schema_version", "version", "created", "backbone", "groups",
                                       "tasks": [[name, entry sha256], ...]}

A version is the index's content hash, and the index names each entry by the hash of its bytes, so a version is
as immutable as the monolithic manifest it replaces, while a change writes one entry and an index of ~100 bytes a
task: at 10,000 tasks of 55 classes the manifest was 21 MB, serialised at every change and parsed by every
follower. A reader parses only the entries it has not parsed before (`known`, by sha256). A version file holding
a whole manifest (the first store layout) is still read, through mmserve.registry.parse_manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mmserve.errors import RegistryError
from mmserve.registry import (
    SCHEMA_VERSION,
    BackboneRef,
    GroupEntry,
    Manifest,
    TaskEntry,
    check_manifest_names,
    now_iso,
)
from mmserve.strict import from_dict

INDEX_FORMAT = "mmserve-index-1"
ENTRIES = "entries"


def entry_name(sha: str) -> str:
    """A task entry's blob inside a store."""
    return f"{ENTRIES}/{sha}.json"


def encode_entry(task: TaskEntry) -> bytes:
    """A task entry's blob bytes: compact JSON with sorted keys (equal entries, equal bytes)."""
    return json.dumps(vars(task), sort_keys=True, separators=(",", ":")).encode()


def _content_version(content: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def _content(manifest: Manifest, tasks: Sequence[tuple[str, str]]) -> dict:
    return {"format": INDEX_FORMAT, "schema_version": SCHEMA_VERSION, "backbone": dict(vars(manifest.backbone)),
            "groups": [dict(vars(g)) for g in manifest.groups], "tasks": [list(t) for t in tasks]}


def seal_index(manifest: Manifest, known: Mapping[int, str]) -> tuple[bytes, dict[str, bytes], dict[str, str]]:
    """Stamp a manifest whose weights are written (times, schema, version); return its index bytes, the entry
    blobs not in `known` (id of an entry object -> its sha256, for entries taken over from the base version)
    by sha256, and every task's entry sha256 by name."""
    fresh: dict[str, bytes] = {}
    shas: dict[str, str] = {}
    for task in manifest.tasks:
        sha = known.get(id(task))
        if sha is None:
            task.created = task.created or now_iso()
            data = encode_entry(task)
            sha = hashlib.sha256(data).hexdigest()
            fresh[sha] = data
        shas[task.name] = sha
    manifest.schema_version = SCHEMA_VERSION
    content = _content(manifest, list(shas.items()))
    manifest.version = _content_version(content)
    manifest.created = now_iso()
    index = {"version": manifest.version, "created": manifest.created, **content}
    return json.dumps(index, separators=(",", ":")).encode() + b"\n", fresh, shas


def is_index(data: object) -> bool:
    """True for a version file in this format (else: a whole manifest)."""
    return isinstance(data, dict) and data.get("format") == INDEX_FORMAT


def parse_index(data: dict, where: str, read_entry: Callable[[str], bytes],
                known: Mapping[str, TaskEntry]) -> tuple[Manifest, dict[str, str]]:
    """The manifest of a version index (parsed JSON) and its entries' sha256 by task name; entries in `known`
    (by sha256) are taken over, the others read with `read_entry(sha)` and checked: bytes against their hash,
    fields strictly, name against the index. Errors name `where` and the field."""
    for key in ("version", "backbone", "groups", "tasks"):
        if key not in data:
            raise RegistryError(f"{where}: missing field '{key}'")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RegistryError(f"{where}: schema_version: unsupported value {data.get('schema_version')!r}")
    content = {k: v for k, v in data.items() if k not in ("version", "created")}
    if _content_version(content) != data["version"]:
        raise RegistryError(f"{where}: version: the content hash is {_content_version(content)}, the file says "
                            f"{data['version']!r} (edited by hand?)")
    if not isinstance(data["groups"], list) or not isinstance(data["tasks"], list):
        raise RegistryError(f"{where}: groups and tasks must be lists")
    backbone = from_dict(BackboneRef, data["backbone"], f"{where}: backbone", RegistryError)
    groups = [from_dict(GroupEntry, g, f"{where}: groups[{i}]", RegistryError) for i, g in enumerate(data["groups"])]
    tasks: list[TaskEntry] = []
    shas: dict[str, str] = {}
    for i, item in enumerate(data["tasks"]):
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise RegistryError(f"{where}: tasks[{i}]: expected [name, entry sha256], got {json.dumps(item)[:80]}")
        name, sha = item
        task = known.get(sha)
        if task is None:
            at = f"{where}: tasks[{name}] ({entry_name(sha)})"
            raw = read_entry(sha)
            if hashlib.sha256(raw).hexdigest() != sha:
                raise RegistryError(f"{at}: bytes do not match their sha256 (corrupt or replaced)")
            try:
                task = from_dict(TaskEntry, json.loads(raw), at, RegistryError)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RegistryError(f"{at}: invalid JSON: {exc}") from None
        if task.name != name:
            raise RegistryError(f"{where}: tasks[{i}]: the index names {name!r}, its entry {task.name!r}")
        tasks.append(task)
        shas[name] = sha
    manifest = Manifest(backbone, groups, tasks, SCHEMA_VERSION, data["version"], str(data.get("created", "")))
    check_manifest_names(manifest, Path(where))
    return manifest, shas
