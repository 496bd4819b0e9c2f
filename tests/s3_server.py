"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, in its own process.

    with running_s3_server(tmp_path / "moto.log") as s3:
        s3.bucket                       # created, empty
        s3.url("prepared")              # "s3://<bucket>/prepared"
        s3.secret                       # the fake secret key: grep outputs for it
        s3.requested()                  # the object keys the server was asked for, in order

While it runs, `os.environ` carries fake credentials and the endpoint (`AWS_ENDPOINT_URL`, honoured
by botocore >= 1.31 and so by s3fs), so the test and every subprocess it starts (prepare, accelerate
launch and its ranks, their DataLoader workers) reach this server and only it: a developer's
~/.aws files and FSSPEC_S3_* settings are masked. Everything is restored afterwards.

A separate process rather than moto's ThreadedMotoServer: the server must keep answering while the
test process itself blocks or reads (a thread would share its interpreter's lock).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

START_TIMEOUT = 60.0
_REQUEST = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) /([^ ?]*)[^"]* HTTP/1\.1[^"]*" (\d{3})')


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    key_id: str
    secret: str
    log: Path

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def requested(self, method: str = "GET") -> list[str]:
        """Object keys (`bucket/key`) of the server's answered `method` requests so far, in order."""
        text = _strip_ansi(self.log.read_text(errors="replace")) if self.log.exists() else ""
        return [m.group(2) for m in _REQUEST.finditer(text) if m.group(1) == method and m.group(3).startswith("2")]


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log: Path) -> tuple[subprocess.Popen, int]:
    """Start the server on a free port; retried when another process takes the port first."""
    for _ in range(3):
        port = _free_port()
        with open(log, "a") as handle:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"moto server did not listen on port {port} within {START_TIMEOUT} s:\n{log.read_text()}")
    raise RuntimeError(f"moto server could not start:\n{log.read_text()}")


@contextlib.contextmanager
def running_s3_server(log: Path) -> Iterator[S3Server]:
    import s3fs

    log.parent.mkdir(parents=True, exist_ok=True)
    proc, port = _start(log)
    tag = uuid.uuid4().hex[:12]
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket=f"emotrain-{tag}",
                      key_id=f"AKIAEMOTRAIN{tag.upper()}", secret=f"emotrain-secret-{uuid.uuid4().hex}", log=log)
    masked = [name for name in os.environ if name.startswith("FSSPEC_S3") or name in ("AWS_PROFILE", "AWS_SESSION_TOKEN")]
    saved = {name: os.environ.get(name) for name in masked + [
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
        "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"]}
    for name in masked:
        del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID=server.key_id, AWS_SECRET_ACCESS_KEY=server.secret, AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=server.endpoint,
        # No profile, region or addressing style from this machine's own AWS files.
        AWS_CONFIG_FILE=str(log.parent / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(log.parent / "no-aws-credentials"),
    )
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3fs.S3FileSystem().mkdir(server.bucket)
        yield server
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
