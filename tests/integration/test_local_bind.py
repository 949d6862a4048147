"""`sdserve serve --host 127.0.0.1` keeps its embedded Ray on loopback: nothing it starts listens on another
interface, except the two Serve servers whose address Ray hard-codes (listed below, with where)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serving.local import free_port
from tests.integration.conftest import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Generous: the whole app starts on a loaded 2-core machine; nothing here measures speed.
READY_DEADLINE_S = 300
STOP_DEADLINE_S = 120


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str  # the command line; Ray names its workers there (ray::ServeReplica:..., ray::ProxyActor)
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.address.split("%")[0])
        # gRPC's sockets are IPv6 ones: 127.0.0.1 shows as ::ffff:127.0.0.1, which is_loopback misses
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return (mapped or address).is_loopback

    def __str__(self) -> str:
        label = " ".join(Path(arg).name for arg in self.process.split()[:3] if not arg.startswith("-"))
        return f"{self.address}:{self.port} ({label[:60]}, pid {self.pid})"


def process_tree(root: psutil.Process, ray_tmp: Path) -> list[psutil.Process]:
    """``root``, its descendants and any other process of this Ray instance (Ray's own processes name its
    session directory, under ``ray_tmp``, on their command lines)."""
    found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for p in psutil.process_iter(["cmdline"]):
        if str(ray_tmp) in " ".join(p.info["cmdline"] or []):
            found.setdefault(p.pid, p)
    return list(found.values())


def listeners(processes: list[psutil.Process]) -> list[Listener]:
    result = []
    for p in processes:
        try:
            name = " ".join(p.cmdline()) or p.name()
            sockets = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        result += [Listener(p.pid, name, s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN]
    return result


@contextmanager
def sdserve_serve(config_file: Path, port: int, ray_tmp: Path) -> Iterator[psutil.Process]:
    """Run `sdserve serve --host 127.0.0.1` on its own Ray (own temp dir); yield its process once /readyz is 200.
    Afterwards nothing it started is left running."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    command = [str(Path(sys.executable).parent / "sdserve"), "serve", "--config", str(config_file)]
    log_path = config_file.with_suffix(".log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    root = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        ready = False
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            with suppress(httpx.HTTPError):
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
            time.sleep(0 if ready else 1)
        assert ready, f"`sdserve serve` never became ready:\n{log_path.read_text()[-3000:]}"
        yield root
    finally:
        if proc.poll() is None:
            started = [p for p in process_tree(root, ray_tmp) if p.pid != proc.pid]
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C: cmd_serve stops Serve and Ray
        try:
            proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        # Ray's processes end with their driver; any that did not is killed here.
        _, alive = psutil.wait_procs(started, timeout=30)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=30)


def test_loopback_host_keeps_ray_listeners_on_loopback(tiny_model_dir: Path, tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    config_file = tmp_path / "sdserve.yaml"
    config = tiny_config(tiny_model_dir, tmp_path / "outputs", grpc={"port": grpc_port})
    config_file.write_text(yaml.safe_dump(config.to_args()))
    # Short on purpose: Ray's unix socket paths under it must stay within 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="sdray-", dir="/tmp"))
    try:
        with sdserve_serve(config_file, http_port, ray_tmp) as root:
            found = listeners(process_tree(root, ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    listing = "\n".join(f"  {x}" for x in sorted(found, key=lambda x: (x.process, x.port)))
    assert any(x.port == http_port and x.loopback for x in found), f"no HTTP proxy on loopback:\n{listing}"
    # Serve binds two kinds of server to all interfaces whatever it is asked (Ray 2.60):
    # - its gRPC proxy: gRPCOptions has no host, the proxy adds "[::]:{port}" (ray/serve/_private/grpc_util.py:204);
    # - each replica's inter-deployment gRPC server, added as "[::]:0" (ray/serve/_private/replica.py:1835).
    exposed = [x for x in found if not x.loopback]
    proxy = [x.port for x in exposed if x.process.startswith("ray::ProxyActor")]
    replicas = {x.pid: x for x in found if x.process.startswith("ray::ServeReplica")}
    replica_servers = [x.pid for x in exposed if x.pid in replicas]
    others = [x for x in exposed if x.pid not in replicas and not x.process.startswith("ray::ProxyActor")]
    assert not others, "listening beyond loopback:\n" + "\n".join(f"  {x}" for x in others) + f"\nall:\n{listing}"
    assert proxy == [grpc_port], f"only Serve's gRPC proxy may listen beyond loopback in the proxy:\n{listing}"
    assert replicas and sorted(replica_servers) == sorted(replicas), f"one per replica process:\n{listing}"
