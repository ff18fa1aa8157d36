"""Install or locate the offline data sources (npm packages, Debian packages)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mmserve.errors import MmserveError

NPM_PACKAGES: tuple[str, ...] = (
    "emojibase-data@17.0.0",
    "@iconify-json/noto@1.2.9",
    "@iconify-json/twemoji@1.2.5",
    "@iconify-json/openmoji@1.2.29",
    "@iconify-json/fluent-emoji@1.2.7",
    "@iconify-json/fluent-emoji-flat@1.2.6",
    "@iconify-json/fluent-emoji-high-contrast@1.2.6",
    "openmoji@17.0.0",
)

DEBIAN_PACKAGES: tuple[str, ...] = ("openclipart-png", "openclipart-svg", "tuxpaint-stamps-default")

OPENCLIPART_DIR = Path("/usr/share/openclipart")
TUXPAINT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")


class SourceError(MmserveError, RuntimeError):
    """A data source could not be installed, found or read; the message names it (shown without a traceback)."""


def read_json(path: Path) -> Any:
    """Parse a package data file; a missing, unreadable or broken file is a SourceError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(f"{path}: not found (is its npm package installed?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read ({exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None


def split_spec(spec: str) -> tuple[str, str]:
    """Split an npm spec like `@scope/name@1.2.3` into name and version."""
    name, _, version = spec.rpartition("@")
    return name, version


def npm_root(cache_dir: Path) -> Path:
    """Folder holding the installed npm packages."""
    return cache_dir / "npm" / "node_modules"


def installed_version(root: Path, package: str) -> str | None:
    """The version of an npm package installed under `root` (node_modules), None when absent or unreadable."""
    try:
        version = json.loads((root / package / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def _npm_installed(cache_dir: Path, spec: str) -> bool:
    """Whether the exact package version is already installed in the cache."""
    name, version = split_spec(spec)
    return installed_version(npm_root(cache_dir), name) == version


def ensure_npm(cache_dir: Path, packages: tuple[str, ...] = NPM_PACKAGES) -> Path:
    """Install the npm packages (exact versions) under `<cache>/npm` unless already there."""
    missing = [p for p in packages if not _npm_installed(cache_dir, p)]
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            raise SourceError(f"npm is not installed; cannot install {' '.join(missing)}")
        prefix = cache_dir / "npm"
        prefix.mkdir(parents=True, exist_ok=True)
        print(f"[sources] npm install --prefix {prefix} {' '.join(missing)}", flush=True)
        proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), *missing],
                              capture_output=True, text=True)
        still = [p for p in missing if not _npm_installed(cache_dir, p)]
        if proc.returncode != 0 or still:
            raise SourceError(f"npm install failed for {' '.join(still or missing)}: {proc.stderr.strip()[-2000:]}")
    return npm_root(cache_dir)


def deb_installed(package: str) -> bool:
    """Whether a Debian package is installed (dpkg status `ii`)."""
    if shutil.which("dpkg-query") is None:
        return False
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip().endswith("installed")


def ensure_debian(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> list[str]:
    """Install the Debian packages with apt-get unless installed; return those still missing."""
    missing = [p for p in packages if not deb_installed(p)]
    if not missing:
        return []
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        print(f"[sources] ERROR: Debian packages not installed and cannot apt-get (need root): {' '.join(missing)}",
              flush=True)
        return missing
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"[sources] apt-get install -y {' '.join(missing)}", flush=True)
    proc = subprocess.run([apt, "install", "-y", *missing], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        subprocess.run([apt, "update"], capture_output=True, text=True, env=env)
        subprocess.run([apt, "install", "-y", *missing], capture_output=True, text=True, env=env)
    still = [p for p in missing if not deb_installed(p)]
    for p in still:
        print(f"[sources] ERROR: could not install Debian package {p}", flush=True)
    return still
