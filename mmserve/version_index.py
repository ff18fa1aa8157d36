"""A store version as an index naming one content-addressed blob per task entry.

    <store>/entries/<sha256>.json     one task's manifest entry (compact JSON, keys sorted)
    <store>/entries/pack-<sha256>.jsonl   many entries, one per line (each line an entry's exact bytes)
    <store>/versions/<version>.json   {"format", "schema_version", "version", "created", "backbone", "groups",
                                       "packs": [pack sha256, ...], "tasks": [[name, entry sha256], ...]}

A version is the index's content hash, and the index names each entry by the hash of its bytes, so a version is
as immutable as the monolithic manifest it replaces, while a change writes one entry and an index of ~100 bytes a
task: at 10,000 tasks of 55 classes the manifest was 21 MB, serialised at every change and parsed by every
follower. A reader parses only the entries it has not parsed before (`known`, by sha256). An entry is read from
the version's packs when one holds it, else from its own file: a version that brings more than REPACK_SHARE of
its entries (and at least REPACK_MIN) anew writes one pack of all of them, so a cold reader of 100,000 tasks opens
one file, not 100,000 (on S3: one GET). A version file holding a whole manifest (the first store layout) is still
read, through mmserve.registry.parse_manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
REPACK_MIN, REPACK_SHARE = 256, 0.1  # a version writes a pack when it brings more new entries than both


def entry_name(sha: str) -> str:
    """A task entry's blob inside a store."""
    return f"{ENTRIES}/{sha}.json"


def pack_name(sha: str) -> str:
    """A pack of entries inside a store."""
    return f"{ENTRIES}/pack-{sha}.jsonl"


@dataclass(frozen=True)
class Sealed:
    """What writing a version takes: its index, the files to write before it (name -> bytes), and what a reader
    of it keeps: each task's entry sha256, the packs it names and the entries they hold."""

    index: bytes
    files: dict[str, bytes]
    shas: dict[str, str]
    packs: tuple[str, ...]
    packed: frozenset[str]


def encode_entry(task: TaskEntry) -> bytes:
    """A task entry's blob bytes: compact JSON with sorted keys (equal entries, equal bytes)."""
    return json.dumps(vars(task), sort_keys=True, separators=(",", ":")).encode()


def _content_version(content: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def _content(manifest: Manifest, tasks: Sequence[tuple[str, str]], packs: Sequence[str]) -> dict:
    return {"format": INDEX_FORMAT, "schema_version": SCHEMA_VERSION, "backbone": dict(vars(manifest.backbone)),
            "groups": [dict(vars(g)) for g in manifest.groups], "packs": list(packs),
            "tasks": [list(t) for t in tasks]}


def seal_index(manifest: Manifest, known: Mapping[int, str], packs: Sequence[str] = (),
               packed: frozenset[str] = frozenset()) -> Sealed:
    """Stamp a manifest whose weights are written (times, schema, version) and make its files. `known`: id of an
    entry object -> its sha256, for the entries taken over from the base version, whose `packs` hold `packed`."""
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
    loose = {sha for sha in shas.values() if sha not in packed}
    files: dict[str, bytes]
    if len(loose) > max(REPACK_MIN, REPACK_SHARE * len(shas)):  # one pack of every entry of this version
        lines = [fresh.get(sha) or encode_entry(task) for task, sha in zip(manifest.tasks, shas.values(),
                                                                             strict=True)]
        pack = b"\n".join(lines) + b"\n"
        pack_sha = hashlib.sha256(pack).hexdigest()
        packs, packed, files = (pack_sha,), frozenset(shas.values()), {pack_name(pack_sha): pack}
    else:
        files = {entry_name(sha): data for sha, data in fresh.items() if sha not in packed}
    manifest.schema_version = SCHEMA_VERSION
    content = _content(manifest, list(shas.items()), packs)
    manifest.version = _content_version(content)
    manifest.created = now_iso()
    index = {"version": manifest.version, "created": manifest.created, **content}
    return Sealed(json.dumps(index, separators=(",", ":")).encode() + b"\n", files, shas, tuple(packs), packed)


def unpack(data: bytes, sha: str, where: str) -> dict[str, bytes]:
    """A pack's entries by sha256, its bytes checked against `sha`."""
    if hashlib.sha256(data).hexdigest() != sha:
        raise RegistryError(f"{where}: bytes do not match their sha256 (corrupt or replaced)")
    return {hashlib.sha256(line).hexdigest(): line for line in data.split(b"\n") if line}


def is_index(data: object) -> bool:
    """True for a version file in this format (else: a whole manifest)."""
    return isinstance(data, dict) and data.get("format") == INDEX_FORMAT


def check_index(data: dict, where: str) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """A version index's structure and content hash checked; its [name, entry sha256] items and its packs."""
    for key in ("version", "backbone", "groups", "tasks"):
        if key not in data:
            raise RegistryError(f"{where}: missing field '{key}'")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RegistryError(f"{where}: schema_version: unsupported value {data.get('schema_version')!r}")
    content = {k: v for k, v in data.items() if k not in ("version", "created")}
    if _content_version(content) != data["version"]:
        raise RegistryError(f"{where}: version: the content hash is {_content_version(content)}, the file says "
                            f"{data['version']!r} (edited by hand?)")
    packs = data.get("packs", [])
    if not isinstance(packs, list) or not all(isinstance(p, str) for p in packs):
        raise RegistryError(f"{where}: packs: expected a list of sha256, got {json.dumps(packs)[:80]}")
    if not isinstance(data["groups"], list) or not isinstance(data["tasks"], list):
        raise RegistryError(f"{where}: groups and tasks must be lists")
    for i, item in enumerate(data["tasks"]):
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise RegistryError(f"{where}: tasks[{i}]: expected [name, entry sha256], got {json.dumps(item)[:80]}")
    return [(name, sha) for name, sha in data["tasks"]], tuple(packs)


def parse_index(data: dict, where: str, items: list[tuple[str, str]], read_entry: Callable[[str], bytes],
                known: Mapping[str, TaskEntry]) -> tuple[Manifest, dict[str, str]]:
    """The manifest of a version index that check_index passed (its `items`) and its entries' sha256 by task
    name; entries in `known` (by sha256) are taken over, the others read with `read_entry(sha)` (from a pack or
    their own file; bytes it has checked against their hash) and checked: fields strictly, name against the
    index. Errors name `where` and the field."""
    backbone = from_dict(BackboneRef, data["backbone"], f"{where}: backbone", RegistryError)
    groups = [from_dict(GroupEntry, g, f"{where}: groups[{i}]", RegistryError) for i, g in enumerate(data["groups"])]
    needed = list(dict.fromkeys(sha for _, sha in items if sha not in known))
    raws = [read_entry(sha) for sha in needed]
    try:  # one parse of every new entry (each alone only to name a bad one)
        parsed = json.loads(b"[" + b",".join(raws) + b"]") if raws else []
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = []
        for sha, raw in zip(needed, raws, strict=True):
            try:
                parsed.append(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RegistryError(f"{where}: {entry_name(sha)}: invalid JSON: {exc}") from None
    by_sha = dict(known)
    names = {sha: name for name, sha in items}
    for sha, value in zip(needed, parsed, strict=True):
        by_sha[sha] = from_dict(TaskEntry, value, f"{where}: tasks[{names[sha]}] ({entry_name(sha)})", RegistryError)
    tasks: list[TaskEntry] = []
    shas: dict[str, str] = {}
    for i, (name, sha) in enumerate(items):
        task = by_sha[sha]
        if task.name != name:
            raise RegistryError(f"{where}: tasks[{i}]: the index names {name!r}, its entry {task.name!r}")
        tasks.append(task)
        shas[name] = sha
    manifest = Manifest(backbone, groups, tasks, SCHEMA_VERSION, data["version"], str(data.get("created", "")))
    check_manifest_names(manifest, Path(where))
    return manifest, shas
