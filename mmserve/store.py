"""The registry store: content-addressed blobs, immutable versions and a pointer moved by compare-and-swap.

Layout, at a local path or an fsspec URL (`s3://bucket/prefix` through s3fs):
    <store>/blobs/<sha256>.safetensors      prompt weights (one task's or one group's), and class text features
    <store>/versions/<version>.json         a registry manifest whose weights name blobs/<sha256>.safetensors
    <store>/HEAD.json                       {"version", "sequence", "history": [...]}: the version served

A write goes blobs, then version, then HEAD; HEAD moves only if it still names the version the write started
from (compare-and-swap: an flock on a local disk, a conditional PUT (If-Match / If-None-Match) on S3), so a writer
that read a stale version gets StaleVersionError, and a crash at any point leaves HEAD on the old version or the
new one, both complete. Versions share the blobs of the tasks they did not change. A directory in the older
layout (manifest.json beside groups/ and tasks/) is read as a store with one version and no history.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mmserve.errors import RegistryError
from mmserve.fileio import atomic_write_bytes
from mmserve.registry import MANIFEST, Manifest, now_iso, parse_manifest
from mmserve.strict import from_dict
from mmserve.version_index import check_index, entry_name, is_index, pack_name, parse_index, seal_index, unpack

HEAD = "HEAD.json"
HEAD_FORMAT = "mmserve-store-1"
HISTORY_KEPT = 1000  # history entries HEAD keeps (the versions they name stay until `gc`)
PARSED_KEPT = 4  # parsed versions kept in memory: a change reads its base and its result, a follower both


@dataclass(frozen=True)
class Parsed:
    """A version as this process keeps it parsed (see Store.parsed)."""

    manifest: Manifest
    shas: dict[str, str] | None = None  # entry sha256 by task name; None for a version holding a whole manifest
    packs: tuple[str, ...] = ()
    packed: frozenset[str] = frozenset()


_PARSED: OrderedDict[tuple[str, str], Parsed] = OrderedDict()  # by (store url, version)


class StaleVersionError(RegistryError):
    """The store's current version moved since the write started (HTTP 409): re-read and try again."""


class StoreUnreachableError(RegistryError):
    """The store's filesystem does not answer (a one-line message naming the URL)."""


@dataclass(frozen=True)
class HistoryEntry:
    """One move of HEAD: which version it moved to, by what operation, when."""

    sequence: int
    version: str
    operation: str
    created: str


@dataclass(frozen=True)
class Head:
    """HEAD.json: the current version, its sequence number and the recent history (newest last)."""

    version: str
    sequence: int
    history: tuple[HistoryEntry, ...] = ()
    format: str = HEAD_FORMAT

    def to_json(self) -> bytes:
        """HEAD.json's bytes."""
        return (json.dumps({**asdict(self), "history": [asdict(h) for h in self.history]}, indent=1) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Head:
        """Read HEAD.json strictly."""
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{where}: invalid JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != HEAD_FORMAT:
            raise RegistryError(f"{where}: format: not an mmserve store pointer ({HEAD_FORMAT})")
        history = raw.get("history", [])
        if not isinstance(history, list):
            raise RegistryError(f"{where}: history: expected a list")
        entries = tuple(from_dict(HistoryEntry, h, f"{where}: history[{i}]", RegistryError)
                        for i, h in enumerate(history))
        return from_dict(cls, {**raw, "history": entries}, where, RegistryError, check_types=False)


def version_name(version: str) -> str:
    """A version's manifest inside a store."""
    return f"versions/{version}.json"


def blob_name(sha: str) -> str:
    """A blob's path inside the store."""
    return f"blobs/{sha}.safetensors"


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Store:
    """A registry store at `url` (a local path or an fsspec URL); `legacy` for a directory in the older layout."""

    url: str
    fs: Any = field(repr=False)
    root: str  # the store's path on `fs`
    legacy: bool = False
    durable: bool = True  # False: local writes skip fsync (throwaway benchmark stores; a crash may tear a file)

    # ---- opening -----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str | Path, storage_options: dict[str, Any] | None = None) -> Store:
        """The store at `url`; local paths need not exist yet (a first write creates them)."""
        import fsspec

        text = str(url)
        options = dict(storage_options or {})
        if text.startswith("s3://"):
            options = {**s3_options_from_env(), **options}
        try:
            fs, root = fsspec.core.url_to_fs(text, **options)
        except (ImportError, ValueError) as exc:
            raise RegistryError(f"{text}: cannot open this store URL ({exc})") from None
        store = cls(text, fs, root.rstrip("/") or root)
        store.legacy = not store._exists(HEAD) and store._exists(MANIFEST)
        return store

    @cached_property
    def is_local(self) -> bool:
        """True on the local filesystem (compare-and-swap by flock)."""
        return "file" in _protocols(self.fs)

    def path_of(self, name: str) -> str:
        """A file's path on the store's filesystem."""
        return f"{self.root}/{name}"

    def where(self, name: str) -> str:
        """A file's location as users see it (for messages)."""
        return f"{self.url.rstrip('/')}/{name}"

    def _exists(self, name: str) -> bool:
        try:
            return bool(self.fs.exists(self.path_of(name)))
        except FileNotFoundError:
            return False
        except Exception as exc:  # OSError, or botocore's EndpointConnectionError...
            raise StoreUnreachableError(f"{self.url}: store unreachable ({_reason(exc)})") from None

    def _cat(self, name: str) -> bytes:
        if self.is_local:  # plain open(): fsspec's local layer costs more than the read (thousands of blobs)
            with open(self.path_of(name), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path_of(name))

    def read(self, name: str) -> bytes:
        """A file's bytes; RegistryError naming it when it is missing."""
        try:
            return self._cat(name)
        except FileNotFoundError:
            raise RegistryError(f"{self.where(name)}: missing") from None
        except Exception as exc:  # OSError, or botocore's EndpointConnectionError...
            raise StoreUnreachableError(f"{self.url}: store unreachable reading {name} ({_reason(exc)})") from None

    def read_optional(self, name: str) -> bytes | None:
        """A file's bytes, or None when it is not there."""
        try:
            return self._cat(name)
        except FileNotFoundError:
            return None
        except Exception as exc:  # OSError, or botocore's EndpointConnectionError...
            raise StoreUnreachableError(f"{self.url}: store unreachable reading {name} ({_reason(exc)})") from None

    def write(self, name: str, data: bytes) -> None:
        """Write a whole file (atomically: a reader sees none of it or all of it)."""
        if self.is_local:
            atomic_write_bytes(self.path_of(name), data, durable=self.durable)
            return
        try:
            self.fs.pipe_file(self.path_of(name), data)
        except Exception as exc:  # OSError, or botocore's EndpointConnectionError...
            raise StoreUnreachableError(f"{self.url}: store unreachable writing {name} ({_reason(exc)})") from None

    # ---- blobs and versions ------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        """Store bytes under their sha256 (nothing written when the blob is there); returns the sha256."""
        sha = sha256_bytes(data)
        if not self._exists(blob_name(sha)):
            self.write(blob_name(sha), data)
        return sha

    def get_blob(self, sha: str, where: str = "") -> bytes:
        """A blob's bytes, checked against its name: RegistryError naming the file (and `where`) otherwise."""
        name = blob_name(sha)
        data = self.read(name)
        if sha256_bytes(data) != sha:
            raise RegistryError(f"{self.where(name)}: {where + ': ' if where else ''}bytes do not match their "
                                f"sha256 (corrupt or replaced)")
        return data

    def put_version(self, manifest: Manifest, base: str | None = None) -> str:
        """Write a manifest whose weights are written as an immutable version (its new entries or a pack, then
        its index; mmserve.version_index) and stamp its id on it; entries taken over from version `base`
        unchanged (the same objects, as mmserve.versions copies them) are not written again. The manifest is
        kept as the version's parse in this process: the writer must not change it after."""
        cached = _PARSED.get((self.url, base)) if base else None
        if cached is not None and cached.shas is not None:
            sealed = seal_index(manifest, {id(t): cached.shas[t.name] for t in cached.manifest.tasks},
                                cached.packs, cached.packed)
        else:
            sealed = seal_index(manifest, {})
        for name, data in sealed.files.items():  # entries, then the index naming them: never an index naming a gap
            if not self._exists(name):
                self.write(name, data)
        name = version_name(manifest.version)
        if not self._exists(name):
            self.write(name, sealed.index)
        self._keep(manifest.version, Parsed(manifest, sealed.shas, sealed.packs, sealed.packed))
        return manifest.version

    def get_version(self, version: str, fresh: bool = False) -> Manifest:
        """The manifest of `version`, validated strictly; shared with every caller in this process that asks for
        the same version of the same store (versions are immutable: never change the object, copy it). `fresh`
        reads the files whatever this process holds (verify; rollback, which must see a collected version gone)."""
        cached = None if fresh or self.legacy else _PARSED.get((self.url, version))
        if cached is not None:
            _PARSED.move_to_end((self.url, version))
            return cached.manifest
        with paused_gc():
            parsed = self._parse_version(version)
        if not self.legacy:
            self._keep(version, parsed)
        return parsed.manifest

    def parsed(self, version: str) -> Parsed:
        """`version` as this process keeps it: its manifest, each task's entry sha256 (None for a version holding
        a whole manifest), the packs its index names and the entries they hold."""
        self.get_version(version)
        return _PARSED[(self.url, version)]

    def _keep(self, version: str, parsed: Parsed) -> None:
        _PARSED[(self.url, version)] = parsed
        _PARSED.move_to_end((self.url, version))
        while len(_PARSED) > PARSED_KEPT:
            _PARSED.popitem(last=False)

    def _parse_version(self, version: str) -> Parsed:
        if self.legacy:
            manifest = parse_manifest(self.read(MANIFEST), self.where(MANIFEST))
            if version != manifest.version:
                raise RegistryError(f"{self.where(MANIFEST)}: version {version} is not this registry's")
            return Parsed(manifest)
        name = version_name(version)
        raw = self.read(name)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.where(name)}: invalid JSON: {exc}") from None
        if not is_index(data):
            return Parsed(parse_manifest(raw, self.where(name)))
        items, packs = check_index(data, self.where(name))
        known = {p.shas[t.name]: t for p in _PARSED.values() if p.shas for t in p.manifest.tasks}
        wanted = {sha: task for task, sha in items if sha not in known}  # entry sha256 -> task name, to read
        lines: dict[str, bytes] = {}
        packed: set[str] = set()
        for pack in packs:  # one file for most entries, each line's hash checked
            held = unpack(self.read(pack_name(pack)), pack, self.where(pack_name(pack)))
            packed |= held.keys()
            lines.update((sha, line) for sha, line in held.items() if sha in wanted)
        loose = self.read_many([entry_name(sha) for sha in wanted if sha not in lines])

        def read_entry(sha: str) -> bytes:
            if sha in lines:
                return lines[sha]
            data = loose.get(entry_name(sha)) or self.read(entry_name(sha))
            if sha256_bytes(data) != sha:
                raise RegistryError(f"{self.where(entry_name(sha))}: tasks[{wanted.get(sha)}]: bytes do not match "
                                    f"their sha256 (corrupt or replaced)")
            return data

        manifest, shas = parse_index(data, self.where(name), items, read_entry, known)
        return Parsed(manifest, shas, packs, frozenset(packed))

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """Several files' bytes by name, those missing left out (one concurrent request batch on S3)."""
        if self.is_local or len(names) < 2:
            return {n: data for n in names if (data := self.read_optional(n)) is not None}
        try:
            got = self.fs.cat([self.path_of(n) for n in names], on_error="return")
        except Exception as exc:  # OSError, or botocore's EndpointConnectionError...
            raise StoreUnreachableError(f"{self.url}: store unreachable ({_reason(exc)})") from None
        by_path = {self.path_of(n): n for n in names}
        return {by_path[p]: data for p, data in got.items() if isinstance(data, bytes) and p in by_path}

    def manifest_where(self, version: str) -> str:
        """Where version `version`'s manifest is, for messages (a directory registry's manifest.json)."""
        return self.where(MANIFEST if self.legacy else version_name(version))

    def weights_bytes(self, rel: str, sha: str, where: str) -> bytes:
        """The bytes of a manifest's weights file (a blob, or a legacy directory's file), checked by sha256."""
        if not self.legacy:
            if rel != blob_name(sha):
                raise RegistryError(f"{self.where('versions')}: {where}.weights: '{rel}' is not blob {sha}")
            return self.get_blob(sha, where)
        data = self.read(rel)
        if sha256_bytes(data) != sha:
            raise RegistryError(f"{self.where(rel)}: sha256 does not match {where}.sha256 in the manifest "
                                f"(corrupt or replaced)")
        return data

    # ---- the pointer -------------------------------------------------------------------------------------

    def head(self) -> Head | None:
        """HEAD (None for an empty store); a legacy directory's one version, with no history."""
        if self.legacy:
            manifest = parse_manifest(self.read(MANIFEST), self.where(MANIFEST))
            return Head(manifest.version, 0)
        if not self._exists(HEAD):
            return None
        return Head.parse(self.read(HEAD), self.where(HEAD))

    def move_head(self, expected: str | None, version: str, operation: str) -> Head:
        """Point HEAD at `version` if it still names `expected` (None: the store is empty); StaleVersionError else."""
        if self.legacy:
            raise RegistryError(f"{self.where(MANIFEST)}: a directory registry has no versions to move between; "
                                f"copy it into a store first: mmserve registry add STORE {self.url}")
        with self._pointer() as (current, write):
            if (current.version if current else None) != expected:
                raise StaleVersionError(
                    f"{self.where(HEAD)}: the store moved to version {current.version if current else None} "
                    f"since this change read {expected}; re-read and try again")
            sequence = (current.sequence if current else 0) + 1
            history = (*(current.history if current else ()), HistoryEntry(sequence, version, operation, now_iso()))
            head = Head(version, sequence, history[-HISTORY_KEPT:])
            write(head.to_json())
        return head

    @contextmanager
    def _pointer(self) -> Iterator[tuple[Head | None, Any]]:
        """(HEAD as read, a function writing the new HEAD only if nobody wrote it since)."""
        if self.is_local:
            yield from self._local_pointer()
            return
        yield from self._s3_pointer()

    def _local_pointer(self) -> Iterator[tuple[Head | None, Any]]:
        import fcntl

        Path(self.root).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path_of(".head.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # every local writer of this store takes it: read-compare-write is one step
            yield self.head(), lambda data: atomic_write_bytes(self.path_of(HEAD), data)
        finally:
            os.close(fd)  # releases the lock

    def _s3_pointer(self) -> Iterator[tuple[Head | None, Any]]:
        call = getattr(self.fs, "call_s3", None)
        if call is None:
            raise RegistryError(f"{self.url}: this filesystem has no compare-and-swap; use a local path or s3://")
        bucket, key, _ = self.fs.split_path(self.path_of(HEAD))
        try:
            found = call("head_object", Bucket=bucket, Key=key)
            etag = found["ETag"]
        except FileNotFoundError:
            etag = None
        except Exception as exc:  # OSError, or botocore's EndpointConnectionError...
            raise StoreUnreachableError(f"{self.url}: store unreachable ({_reason(exc)})") from None
        head = None if etag is None else Head.parse(self.read(HEAD), self.where(HEAD))
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}

        def write(data: bytes) -> None:
            try:
                call("put_object", Bucket=bucket, Key=key, Body=data, **condition)
            except Exception as exc:  # OSError, or botocore's EndpointConnectionError...
                if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                    raise StaleVersionError(f"{self.where(HEAD)}: another writer moved HEAD first; re-read and "
                                            f"try again") from None
                raise StoreUnreachableError(f"{self.url}: store unreachable ({_reason(exc)})") from None
            finally:
                self.fs.invalidate_cache(self.path_of(HEAD))

        yield head, write

    # ---- maintenance -------------------------------------------------------------------------------------

    def list_names(self, prefix: str) -> list[str]:
        """File names under `prefix` (e.g. 'blobs', 'versions'), without the prefix."""
        try:
            found = self.fs.ls(self.path_of(prefix), detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:  # OSError, or botocore's EndpointConnectionError...
            raise StoreUnreachableError(f"{self.url}: store unreachable ({_reason(exc)})") from None
        return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in found)

    def delete(self, name: str) -> None:
        """Remove one file (gc); a version's parse kept in this process goes with it."""
        if name.startswith("versions/"):
            _PARSED.pop((self.url, name.removeprefix("versions/").removesuffix(".json")), None)
        try:
            self.fs.rm_file(self.path_of(name))
        except FileNotFoundError:
            pass


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic collector off while a version is parsed or built: at 100,000 tasks its full collections,
    triggered by the allocations themselves, cost more than the work (nothing built here is a cycle; refcounts
    free it all the same). Nested pauses keep it off until the outermost ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def forget_parsed() -> None:
    """Drop every version this process keeps parsed (a benchmark's follower measures a parse, as another process
    would)."""
    _PARSED.clear()


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def s3_options_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """s3fs options from the usual variables: AWS_ENDPOINT_URL (or MMSERVE_S3_ENDPOINT) for an S3 server that
    is not AWS, such as SeaweedFS; keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY as boto reads them."""
    env = dict(os.environ) if env is None else env
    endpoint = env.get("MMSERVE_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    # a store must answer fast or be reported unreachable: no minutes of boto retries against a dead endpoint
    options["config_kwargs"] = {"connect_timeout": 3, "read_timeout": 20, "retries": {"max_attempts": 2}}
    return options
