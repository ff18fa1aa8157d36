"""The prompt registry: a directory with manifest.json and safetensors weights, written atomically, loaded strictly.

Layout:
    <root>/manifest.json                      schema, backbone fingerprint, groups, tasks
    <root>/groups/<group>-<sha12>.safetensors group-shared prompt weights, once per group
    <root>/tasks/<task>-<sha12>.safetensors   task-specific prompt weights (fusion: MoPE + head)
    <root>/grouping/<group>-<sha12>.safetensors  optional grouping record of a group (GroupingRef): the global
                                              shared prompt of the grouping run and its tasks' averaged gradients

Weight files are content-addressed and written before the manifest, which is replaced last with an atomic
rename: a reader sees either the old registry or the new one, never a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from mmserve.errors import RegistryError
from mmserve.fileio import atomic_write_bytes, sha256_file
from mmserve.strict import from_dict

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("classify", "fuse")
GROUPING = "grouping"  # the folder of groups' grouping records
DEFAULT_TEMPLATE = "a photo of a {}."  # the class-prompt template a task gets when none is chosen


@dataclass
class BackboneRef:
    """The backbone a registry was trained on: prompts only make sense on exactly these weights."""

    model: str
    fingerprint: str
    pretrained: str | None = None


@dataclass
class GroupingRef:
    """A group's grouping record (what a new task needs to choose its group without retraining the others): the
    weights file holding the global shared prompt of the grouping run ("prompt.*") and each of the group's tasks'
    averaged gradient on it ("gradient.<task>"), and how those gradients were taken."""

    prompt_config: dict  # the global shared prompt's module config
    similarity: str  # "dot" or "cosine": how gradients are compared
    center: bool  # scores centred by the mean off-diagonal similarity (training.grouping.center_offset)
    batch_size: int  # per gradient batch
    batches: int  # gradient batches averaged per task
    template: str  # class-prompt template of the gradient passes
    seed: int = 0  # of the gradient batches
    weights: str = ""
    sha256: str = ""


@dataclass
class GroupEntry:
    """A group-shared prompt: one weights file serving every task of the group."""

    name: str
    tasks: list[str]
    prompt_config: dict
    trainable_params: int
    weights: str = ""
    sha256: str = ""
    grouping: dict | None = None  # a GroupingRef's fields (optional: registries before it still load)


@dataclass
class TaskEntry:
    """One servable task: its classes, prompt config and weights (plus head and encoder for fusion)."""

    name: str
    kind: str  # "classify" or "fuse"
    classes: list[str]
    prompt_config: dict
    trainable_params: int
    template: str = DEFAULT_TEMPLATE
    group: str | None = None  # classify: the group whose shared prompt is concatenated before this task's
    metrics: dict = field(default_factory=dict)
    created: str = ""
    head: str | None = None  # fuse: "multiclass" or "multilabel"
    complementary: dict | None = None  # fuse: encoder spec, e.g. {"kind": "clip_text"}
    psi_dim: int | None = None  # fuse: width of the complementary feature
    threshold: float = 0.5  # fuse multilabel: labels with probability above it are returned
    weights: str = ""
    sha256: str = ""


@dataclass
class Manifest:
    """manifest.json: everything needed to validate and rebuild a registry except the tensors."""

    backbone: BackboneRef
    groups: list[GroupEntry]
    tasks: list[TaskEntry]
    schema_version: int = SCHEMA_VERSION
    version: str = ""
    created: str = ""

    def task(self, name: str) -> TaskEntry:
        """The entry of task `name` (KeyError if absent)."""
        return _lookup(self, "tasks", name)

    def group(self, name: str) -> GroupEntry:
        """The entry of group `name` (KeyError if absent)."""
        return _lookup(self, "groups", name)


def _lookup(manifest: Manifest, kind: str, name: str):
    """An entry by name through an index kept beside the list it was made from (rebuilt when the list was
    replaced, grew or shrank, or an entry was renamed): thousands of tasks look their groups up in O(1). The
    index is an attribute outside the dataclass fields, so JSON, equality and `replace` never see it."""
    entries = getattr(manifest, kind)
    cached = manifest.__dict__.get(f"_index_{kind}")
    if cached is None or cached[0] is not entries or cached[1] != len(entries):
        cached = (entries, len(entries), {e.name: e for e in entries})
        manifest.__dict__[f"_index_{kind}"] = cached
    entry = cached[2].get(name)
    if entry is None or entry.name != name:
        for entry in entries:  # an entry renamed or swapped in place since the index was made
            if entry.name == name:
                manifest.__dict__.pop(f"_index_{kind}", None)
                return entry
        raise KeyError(name)
    return entry


@dataclass
class Registry:
    """A loaded registry: its manifest and the tensors of every group and task."""

    root: Path
    manifest: Manifest
    group_weights: dict[str, dict[str, torch.Tensor]]
    task_weights: dict[str, dict[str, torch.Tensor]]

    @property
    def version(self) -> str:
        """Content hash of the manifest: changes whenever anything in the registry changes."""
        return self.manifest.version


def now_iso() -> str:
    """UTC time stamp for manifests."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of a weights file (CPU, contiguous)."""
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _write_tensors(root: Path, sub: str, name: str, tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """Write a content-addressed safetensors file; return (relative path, sha256)."""
    data = tensor_bytes(tensors)
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{sub}/{name}-{digest[:12]}.safetensors"
    atomic_write_bytes(root / rel, data)  # on disk before the manifest that points at it
    return rel, digest


def content_version(payload: Mapping[str, object]) -> str:
    """The version of a manifest's JSON object: a hash of everything but `version` and `created`."""
    content = {k: v for k, v in payload.items() if k not in ("version", "created")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def manifest_dict(manifest: Manifest) -> dict:
    """A manifest as its JSON object, without dataclasses.asdict's deep copies (thousands of tasks: milliseconds)."""
    fields_of = vars  # every field is a JSON value; the entries' own dicts are read, never changed
    top = {k: v for k, v in fields_of(manifest).items() if not k.startswith("_")}  # not the lookup indexes
    return {**top, "backbone": dict(fields_of(manifest.backbone)),
            "groups": [dict(fields_of(g)) for g in manifest.groups],
            "tasks": [dict(fields_of(t)) for t in manifest.tasks]}


def _manifest_version(manifest: Manifest) -> str:
    return content_version(manifest_dict(manifest))


def save_registry(root: str | Path, manifest: Manifest, group_weights: dict[str, dict[str, torch.Tensor]],
                  task_weights: dict[str, dict[str, torch.Tensor]],
                  grouping_weights: Mapping[str, dict[str, torch.Tensor]] | None = None) -> Registry:
    """Write weights then atomically replace manifest.json; unreferenced old weight files are removed after.

    A group whose `grouping` names a record takes its tensors from `grouping_weights` (by group name)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    check_manifest_names(manifest, root / MANIFEST)
    for g in manifest.groups:
        if g.name not in group_weights:
            raise RegistryError(f"{root / MANIFEST}: groups[{g.name}]: no tensors given to save")
        if g.grouping is not None and g.name not in (grouping_weights or {}):
            raise RegistryError(f"{root / MANIFEST}: groups[{g.name}].grouping: no tensors given to save")
    for g in manifest.groups:
        g.weights, g.sha256 = _write_tensors(root, "groups", g.name, group_weights[g.name])
        if g.grouping is not None:
            rel, digest = _write_tensors(root, GROUPING, g.name, grouping_weights[g.name])  # type: ignore[index]
            g.grouping = {**g.grouping, "weights": rel, "sha256": digest}
    for t in manifest.tasks:
        if t.name not in task_weights:
            raise RegistryError(f"{root / MANIFEST}: tasks[{t.name}]: no tensors given to save")
        t.weights, t.sha256 = _write_tensors(root, "tasks", t.name, task_weights[t.name])
    atomic_write_bytes(root / MANIFEST, seal_manifest(manifest))
    referenced = {g.weights for g in manifest.groups} | {t.weights for t in manifest.tasks}
    referenced |= {g.grouping["weights"] for g in manifest.groups if g.grouping is not None}
    for sub in ("groups", "tasks", GROUPING):
        for f in (root / sub).glob("*.safetensors"):
            if f"{sub}/{f.name}" not in referenced:
                f.unlink(missing_ok=True)
    return Registry(root, manifest, dict(group_weights), dict(task_weights))


def _build(cls: type, data: object, where: str):
    """Construct dataclass `cls` from a manifest object (the strict loader, raising RegistryError)."""
    return from_dict(cls, data, where, RegistryError)


def check_manifest_names(manifest: Manifest, path: Path) -> None:
    """Task and group names unique and consistent, kinds, classes and thresholds valid."""
    seen: set[str] = set()
    for t in manifest.tasks:
        if t.name in seen:
            raise RegistryError(f"{path}: tasks: duplicate task name '{t.name}'")
        seen.add(t.name)
        if t.kind not in KINDS:
            raise RegistryError(f"{path}: tasks[{t.name}].kind: '{t.kind}' is not one of {KINDS}")
        if not t.classes or len(set(t.classes)) != len(t.classes):
            raise RegistryError(f"{path}: tasks[{t.name}].classes: must be a non-empty list of distinct names")
    group_list = [g.name for g in manifest.groups]
    groups = set(group_list)
    if len(groups) != len(group_list):
        raise RegistryError(f"{path}: groups: duplicate group name")
    for t in manifest.tasks:
        if t.group is not None and t.group not in groups:
            raise RegistryError(f"{path}: tasks[{t.name}].group: unknown group '{t.group}'")
    for g in manifest.groups:
        for name in g.tasks:
            if name not in seen:
                raise RegistryError(f"{path}: groups[{g.name}].tasks: unknown task '{name}'")
        if g.grouping is not None:
            grouping_ref(g, path)
    for t in manifest.tasks:
        if not 0.0 <= t.threshold <= 1.0:  # also refuses NaN
            raise RegistryError(f"{path}: tasks[{t.name}].threshold: {t.threshold} is not a probability in [0, 1]")


def load_grouping_weights(root: str | Path, group: GroupEntry) -> dict[str, torch.Tensor] | None:
    """The tensors of a directory registry's grouping record of `group` (sha256 checked); None without one."""
    ref = grouping_ref(group, Path(root) / MANIFEST)
    if ref is None:
        return None
    return _load_weights(Path(root), ref.weights, ref.sha256, f"groups[{group.name}].grouping")


def grouping_ref(group: GroupEntry, path: str | Path) -> GroupingRef | None:
    """A group's grouping record reference, read strictly (None when the group has none)."""
    if group.grouping is None:
        return None
    ref = _build(GroupingRef, group.grouping, f"{path}: groups[{group.name}].grouping")
    if ref.similarity not in ("dot", "cosine") or ref.batch_size < 1 or ref.batches < 1:
        raise RegistryError(f"{path}: groups[{group.name}].grouping: similarity must be dot or cosine and "
                            f"batch_size, batches at least 1, got {ref.similarity!r}, {ref.batch_size}, {ref.batches}")
    return ref


def read_manifest(root: str | Path) -> Manifest:
    """Parse and structurally validate manifest.json (no tensors read)."""
    path = Path(root) / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(f"{path}: no manifest (not a registry directory)") from None
    except (OSError, ValueError) as exc:  # a file, a directory without read permission, a NUL byte, ...
        reason = getattr(exc, "strerror", None) or exc
        raise RegistryError(f"{path}: unreadable ({reason}; is {root} a registry directory?)") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: bytes | str, path: str) -> Manifest:
    """Parse and structurally validate a manifest's JSON; errors name `path` and the field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: invalid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{path}: not UTF-8 text: {exc}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RegistryError(f"{path}: schema_version: unsupported value {version!r} (this mmserve reads "
                            f"{SCHEMA_VERSION})")
    for key in ("backbone", "groups", "tasks"):
        if key not in data:
            raise RegistryError(f"{path}: missing field '{key}'")
    for key in ("groups", "tasks"):
        if not isinstance(data[key], list):
            raise RegistryError(f"{path}: {key}: expected a list, got {json.dumps(data[key])[:80]}")
    manifest = _build(Manifest, {
        **data,
        "backbone": _build(BackboneRef, data["backbone"], f"{path}: backbone"),
        "groups": [_build(GroupEntry, g, f"{path}: groups[{i}]") for i, g in enumerate(data["groups"])],
        "tasks": [_build(TaskEntry, t, f"{path}: tasks[{i}]") for i, t in enumerate(data["tasks"])],
    }, path)
    check_manifest_names(manifest, Path(path))
    # the hash of the JSON as read; of the parsed manifest (defaults filled in) only when that differs
    expected = content_version(data)
    if manifest.version != expected:
        expected = _manifest_version(manifest)
    if manifest.version != expected:
        raise RegistryError(f"{path}: version: the content hash is {expected}, the manifest says "
                            f"{manifest.version!r} (edited by hand? write registries with save_registry)")
    return manifest


def seal_manifest(manifest: Manifest, indent: int | None = 2) -> bytes:
    """Stamp schema, content version and time on a manifest whose weights are written; its JSON bytes (indented
    for a directory's manifest.json; a store's versions are compact: json's C encoder, thousands of tasks)."""
    for t in manifest.tasks:
        t.created = t.created or now_iso()
    manifest.schema_version = SCHEMA_VERSION
    manifest.version = _manifest_version(manifest)
    manifest.created = now_iso()
    return (json.dumps(manifest_dict(manifest), indent=indent) + "\n").encode()


def _load_weights(root: Path, rel: str, sha: str, where: str) -> dict[str, torch.Tensor]:
    path = root / rel
    if not rel or not path.is_file():
        raise RegistryError(f"{root / MANIFEST}: {where}.weights: file '{rel}' is missing")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise RegistryError(f"{path}: {where}.weights: unreadable ({exc.strerror or exc})") from None
    if digest != sha:
        raise RegistryError(f"{path}: sha256 does not match {where}.sha256 in the manifest (corrupt or replaced)")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise RegistryError(f"{path}: unreadable safetensors: {exc}") from None


def check_tensors(path: str, expected: dict[str, torch.Size], got: dict[str, torch.Tensor]) -> None:
    """Compare a weights file with the module its config builds: missing, unexpected or wrongly shaped tensors."""
    missing = sorted(set(expected) - set(got))
    if missing:
        raise RegistryError(f"{path}: missing tensor(s) {missing}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        raise RegistryError(f"{path}: unexpected tensor(s) {unexpected}")
    for key, shape in expected.items():
        if tuple(got[key].shape) != tuple(shape):
            raise RegistryError(f"{path}: tensor '{key}' has shape {tuple(got[key].shape)}, the config needs "
                                f"{tuple(shape)}")


def read_registry(root: str | Path) -> Registry:
    """Read a registry from storage: its manifest and every weights file, each checked against its sha256.

    Whether the tensors fit a backbone is the loader's check (mmserve.builders.load_registry).
    """
    root = Path(root)
    manifest = read_manifest(root)
    groups = {g.name: _load_weights(root, g.weights, g.sha256, f"groups[{g.name}]") for g in manifest.groups}
    tasks = {t.name: _load_weights(root, t.weights, t.sha256, f"tasks[{t.name}]") for t in manifest.tasks}
    return Registry(root, manifest, groups, tasks)
