"""Real registry servers on loopback for the tests: moto's S3 server, olah as a Hugging Face hub, and a TCP
proxy that drops connections mid-download. The servers run from their own venv (``make servers``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from models.registry import write_manifest
from serving.local import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVERS_BIN = ROOT / ".cache" / "servers-venv" / "bin"


@contextmanager
def _running(cmd: list[str], log: Path, ready_url: str, cwd: Path | None = None) -> Iterator[None]:
    """Run a server from the servers venv, logging to ``log``, until ``ready_url`` answers; stop it after."""
    with log.open("wb") as out:
        proc = subprocess.Popen([str(_require(cmd[0])), *cmd[1:]], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_http(ready_url, proc, log)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f}s:\n{log.read_text()[-2000:]}")


def _require(binary: str) -> Path:
    path = SERVERS_BIN / binary
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `make servers`")
    return path


@dataclass
class S3Server:
    """moto's standalone S3-compatible server. ``env`` is what boto3 needs to reach it."""

    url: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, endpoint: str | None = None):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3", endpoint_url=endpoint or self.url, aws_access_key_id="testing",
            aws_secret_access_key="testing", region_name="us-east-1",
        )  # fmt: skip

    def gets(self, key_suffix: str) -> int:
        """How many GET requests for keys ending in ``key_suffix`` the server has answered so far."""
        pattern = re.compile(rf'"GET /[^ ]*{re.escape(key_suffix)}(\?[^ ]*)? HTTP')
        return sum(1 for line in self.log.read_text().splitlines() if pattern.search(line))


@contextmanager
def s3_server(workdir: Path) -> Iterator[S3Server]:
    port = free_port()
    log = workdir / "moto.log"
    with _running(["moto_server", "-H", "127.0.0.1", "-p", str(port)], log, f"http://127.0.0.1:{port}/moto-api/"):
        yield S3Server(url=f"http://127.0.0.1:{port}", log=log)


@dataclass
class HubServer:
    """olah in offline mode, serving the git repositories under ``mirrors/models/<org>/<name>``."""

    url: str
    mirrors: Path

    def publish(self, directory: Path, repo_id: str, branch: str = "main") -> str:
        """Commit ``directory`` (with its manifest) to the repo's ``branch``; return the commit hash."""
        repo = self.mirrors / "models" / repo_id
        if not (repo / ".git").exists():
            repo.mkdir(parents=True)
            _git(repo, "init", "-q", "-b", branch)
        else:
            _git(repo, "checkout", "-q", "-B", branch)
        for child in repo.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        write_manifest(directory, revision=branch)
        shutil.copytree(directory, repo, dirs_exist_ok=True)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"publish {directory.name}")
        return _git(repo, "rev-parse", "HEAD").strip()


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


@contextmanager
def hub_server(workdir: Path) -> Iterator[HubServer]:
    port = free_port()
    mirrors = workdir / "mirrors"
    (mirrors / "models").mkdir(parents=True, exist_ok=True)
    config = workdir / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{workdir / "repos"}"\n'
        f'mirrors-path = ["{mirrors}"]\n\n[accessibility]\noffline = true\n'
    )
    with _running(["olah-cli", "-c", str(config)], workdir / "olah.log", f"http://127.0.0.1:{port}/", cwd=workdir):
        yield HubServer(url=f"http://127.0.0.1:{port}", mirrors=mirrors)


class DroppingProxy:
    """A TCP proxy that cuts the first ``drops`` responses longer than ``after_bytes`` in the middle."""

    def __init__(self, upstream_port: int, after_bytes: int, drops: int = 1) -> None:
        self.upstream_port = upstream_port
        self.after_bytes = after_bytes
        self.remaining = drops
        self.dropped = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def pump_up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if sent + len(data) > self.after_bytes and self._take_drop():
                    client.sendall(data[: max(self.after_bytes - sent, 0)])
                    client.shutdown(socket.SHUT_RDWR)
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def _take_drop(self) -> bool:
        with self._lock:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            self.dropped += 1
            return True

    def close(self) -> None:
        self._server.close()
