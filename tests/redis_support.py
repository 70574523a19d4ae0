"""Shared by the tests that need a real Redis (fleet mode): where it is, cleaning up, and
private servers (redis-server processes on free loopback ports, in temp dirs)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

#: the Redis the fleet tests use; a database of their own by default
REDIS_URL = os.environ.get("CAPGATE_REDIS_URL", "redis://127.0.0.1:6379/15")


def reachable(url: str = REDIS_URL) -> bool:
    """Whether a Redis answers PING at ``url`` within a second."""
    try:
        import redis
    except ImportError:
        return False
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


#: skip a test (or module) when no Redis answers
needs_redis = pytest.mark.skipif(
    not reachable(), reason=f"no Redis at {REDIS_URL} (set CAPGATE_REDIS_URL)"
)


def delete_namespace(namespace: str, url: str = REDIS_URL) -> None:
    """Delete every key a test's gates wrote under ``namespace``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# --- private servers: real redis-server processes on loopback, in temp dirs ------------------

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
VALKEY_SERVER = shutil.which("valkey-server")

#: skip a test that starts its own servers when the binary is missing
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="needs the redis-server binary (apt-get install redis-server)"
)


def free_port(*, cluster: bool = False) -> int:
    """A TCP port free on 127.0.0.1 now; for a cluster node, its bus port (+10000) too."""
    if not cluster:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55535)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class Server:
    """One redis-server (or valkey-server, sentinel) process of a test's own, on 127.0.0.1.

    Args:
        workdir: Its directory (config, data, logs); the caller's temp dir.
        options: More ``--name value`` options, as pairs.
        binary: The server binary.
        sentinel: Run as a sentinel (``--sentinel``), from a config file it may rewrite.
        tls: Listen with TLS only, with the certificates in ``tls`` (cert, key, ca).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        options: Sequence[tuple[str, str]] = (),
        binary: str | None = REDIS_SERVER,
        sentinel: bool = False,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        assert binary is not None
        cluster = any(name == "cluster-enabled" for name, _ in options)
        self.port = free_port(cluster=cluster)
        self.dir = workdir / f"node-{self.port}"
        self.dir.mkdir(parents=True)
        self.binary = binary
        self.sentinel = sentinel
        self.tls = tls
        lines = [
            "bind 127.0.0.1",
            f"dir {self.dir}",
            f"logfile {self.dir / 'log.txt'}",
            'save ""',
            "appendonly no",
        ]
        if tls is None:
            lines.append(f"port {self.port}")
        else:
            cert, key, ca = tls
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {cert}",
                f"tls-key-file {key}",
                f"tls-ca-cert-file {ca}",
                "tls-auth-clients no",
            ]
        if sentinel:
            lines = [line for line in lines if not line.startswith(("save", "appendonly"))]
        lines += [f"{name} {value}" for name, value in options]
        self.config = self.dir / ("sentinel.conf" if sentinel else "redis.conf")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> Server:
        args = [self.binary, str(self.config)] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(  # noqa: S603 - a fixed local binary
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.dir / "log.txt"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"{self.binary} did not start on {self.port}:\n{tail}")
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
        ):
            return True
        return False

    def client(self, **kwargs: Any) -> Any:
        import redis

        if self.tls is not None:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls[2]))
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def servers() -> Iterator[tuple[Path, list[Server]]]:
    """A temp dir for servers, and a list in which started servers are stopped at the end."""
    with tempfile.TemporaryDirectory(prefix="capgate-redis-") as tmp:
        started: list[Server] = []
        try:
            yield Path(tmp), started
        finally:
            for server in started:
                server.stop()


def start_cluster(tmp: Path, started: list[Server], masters: int = 3) -> list[Server]:
    """A Redis Cluster of ``masters`` nodes with the slots between them (redis-cli)."""
    assert REDIS_CLI is not None
    nodes = []
    for _ in range(masters):
        node = Server(
            tmp,
            options=[
                ("cluster-enabled", "yes"),
                ("cluster-config-file", "nodes.conf"),
                ("cluster-node-timeout", "2000"),
            ],
        )
        started.append(node.start())
        nodes.append(node)
    subprocess.run(  # noqa: S603 - the local redis-cli
        [
            REDIS_CLI,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    deadline = time.monotonic() + 15
    while not all(_cluster_ok(n) for n in nodes):
        assert time.monotonic() < deadline, "the cluster did not come up"
        time.sleep(0.1)
    return nodes


def _cluster_ok(node: Server) -> bool:
    client = node.client(decode_responses=True)
    try:
        return bool(client.execute_command("CLUSTER INFO").get("cluster_state") == "ok")
    finally:
        client.close()


def cluster_client(nodes: list[Server]) -> Any:
    """A RedisCluster client as a user would build it for capgate (no retries of its own)."""
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    return RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in nodes],
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
