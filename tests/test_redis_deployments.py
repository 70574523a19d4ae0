"""Fleet mode on the Redis deployments people run, each started here from the server binary.

Every server is a real ``redis-server`` (or ``valkey-server``) process on a free loopback
port, in a temp dir, stopped at the end: Redis Cluster (3 masters), Sentinel (a master, a
replica, three sentinels; the master is killed mid-run), an ACL user allowed only what the
scripts need, TLS, and Valkey. Each test skips with the reason when its binary is missing.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from capgate import CapacityGate
from capgate.redis import RedisStore
from capgate.testing import FakeScheduler, serve
from redis_support import (
    REDIS_CLI,
    VALKEY_SERVER,
    Server,
    cluster_client,
    needs_redis_server,
    servers,
    start_cluster,
)

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.loopback, needs_redis_server]

#: the commands fleet mode needs: what its scripts call, and the client's own
ACL_COMMANDS = (
    "+evalsha +script|load +subscribe +unsubscribe +ping "
    "+time +info +publish +get +set +del +exists +pttl +pexpire "
    "+hget +hset +hdel +hincrby +hgetall +hlen +hkeys +hexists "
    "+zadd +zrem +zrange +zrangebyscore +zremrangebyscore +zcard +zscore "
    "+lpush +rpush +ltrim +lrange +sadd +sismember"
)


@pytest.fixture
def anyio_backend() -> str:
    """Real time on asyncio: real servers and sockets."""
    return "asyncio"


async def _run_jobs(gates: list[CapacityGate], url: str, jobs: int, duration: float = 0.2) -> int:
    """``jobs`` jobs through ``gates`` in turn; returns how many were created."""
    done = 0
    async with httpx.AsyncClient() as client:

        async def worker(i: int) -> None:
            nonlocal done
            async with gates[i % len(gates)].slot(timeout=30) as slot:
                response = await client.post(
                    url.replace("/scheduler/available", "/jobs"),
                    json={"email": slot.account, "duration": duration},
                    headers={"Authorization": "Bearer fake-token"},
                )
                assert response.status_code == 200, response.text
                slot.mark_submitted(response.json()["jobId"])
            done += 1

        async with anyio.create_task_group() as tg:
            for i in range(jobs):
                tg.start_soon(worker, i)
    return done


async def _scenario(store: Callable[[], RedisStore], jobs: int = 16) -> FakeScheduler:
    """Two gates of one fleet run ``jobs`` jobs on 3 + 2 slots; returns the fake."""
    fake = FakeScheduler({"a@x.io": 3, "b@x.io": 2}, job_duration=0.2)
    with serve(fake) as url:
        gates = [
            CapacityGate("fake-token", url=url, store=store(), poll_interval=0.15, jitter=0.0)
            for _ in range(2)
        ]
        try:
            assert await _run_jobs(gates, url, jobs) == jobs
        finally:
            for gate in gates:
                await gate.aclose()
    assert fake.rejected_429 == 0
    assert all(fake.peak[a] <= fake.max_jobs[a] for a in fake.max_jobs)
    return fake


def _namespace() -> str:
    return f"capgate-test-{uuid.uuid4().hex[:12]}"


# --- a ready client ---------------------------------------------------------------------------


async def test_a_ready_client_serves_a_fleet_and_stays_open() -> None:
    """RedisStore(client=...) runs a fleet on the caller's client and never closes it."""
    with servers() as (tmp, started):
        server = Server(tmp).start()
        started.append(server)
        client = redis.Redis(
            host="127.0.0.1", port=server.port, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        namespace = _namespace()
        await _scenario(lambda: RedisStore(client=client, namespace=namespace, lease_ttl=2.0))
        assert client.ping()
        assert "client=Redis" in repr(RedisStore(client=client))
        client.close()


def test_client_and_url_are_exclusive() -> None:
    """url= and client= together, or a client that is no redis-py client, raise TypeError."""
    with pytest.raises(TypeError, match=r"^pass url or client, not both$"):
        RedisStore("redis://127.0.0.1:1/0", client=redis.Redis())
    with pytest.raises(TypeError, match=r"^client must be a redis-py client .*, not dict$"):
        RedisStore(client={})


# --- Redis Cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Server]]:
    """Three masters with the 16384 slots between them (redis-cli --cluster create)."""
    if REDIS_CLI is None:
        pytest.skip("needs redis-cli to form a cluster")
    with servers() as (tmp, started):
        yield start_cluster(tmp, started)


async def test_fleet_runs_on_a_redis_cluster_in_one_hash_slot(cluster) -> None:
    """A fleet on a 3-master cluster: every job runs without a 429, and every key the run
    left sits in the one hash slot of its {hash} tag (no script touched another slot)."""
    client = cluster_client(cluster)
    namespace = _namespace()
    try:
        await _scenario(lambda: RedisStore(client=client, namespace=namespace, lease_ttl=2.0))
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        assert len(keys) >= 5
        slots = {client.keyslot(key) for key in keys}
        prefix = keys[0].decode().split("}")[0] + "}"
        assert slots == {client.keyslot(prefix)}
        # and the server agrees
        node = client.get_node_from_key(keys[0])
        assert {
            client.execute_command("CLUSTER KEYSLOT", key, target_nodes=node) for key in keys
        } == slots
        client.delete(*keys)
    finally:
        client.close()


async def test_every_script_runs_on_a_cluster_within_one_slot(cluster) -> None:
    """Each of the fleet's scripts runs on the cluster (which refuses a script that touches a
    key of another slot than its KEYS[1]), and every key they leave is in that one slot."""
    from capgate._engine.fleet import OPERATIONS

    client = cluster_client(cluster)
    namespace = _namespace()
    gate = CapacityGate(
        "fake-token",
        service="ltxstudio",
        store=RedisStore(client=client, namespace=namespace, lease_ttl=2.0),
    )
    store = gate._engine.store
    disp = store._dispatching
    a = "a@x.io"
    calls: dict[str, dict[str, Any]] = {
        "join": {"config": store._config_json},
        "sync": {**disp, "known_tick": 0, "waiters": [["w1", 0, False], ["w2", 1, [a]]]},
        "begin_poll": {"token": "t", "lock_ms": 1000, "force": True},
        "apply": {
            **disp,
            "token": "t",
            "tick": 1,
            "sent": "0",
            "spacing": 5,
            "snap": "{}",
            "limits": [[a, 2]],
            "jobs": ["j0"],
            "floor": 0.5,
            "lag_margin": 1.5,
            "lag_samples": 5,
            "watch_for": 60,
            "watch_max": 100,
        },
        "renew": {
            "owner": disp["owner"],
            "lease_ttl": 2,
            "ttl": 2,
            "held": [["x-1", a, "w1"]],
            "waiters": ["w1", "w2"],
        },
        "settle": {**disp, "lease": "x-1", "account": a, "job": "j1", "waiter": "w1"},
        "give_back": {**disp, "lease": "x-2", "account": a, "busy": True},
        "abandon": {**disp, "waiter": "w2"},
        "quarantine": {"account": a, "seconds": 1, "reason": "r"},
        "restore": {**disp, "account": a},
        "invalidate": {"floor": 0.5},
        "poll_failed": {
            "token": "t",
            "tick": 2,
            "auth": False,
            "message": "x",
            "status": 500,
            "delay": 1,
        },
        "unlock": {"token": "t"},
        "close": {**disp, "held": [], "known_tick": 0},
    }
    try:
        assert set(calls) == set(OPERATIONS)
        generation = ""  # begin_poll's: a poll's answer or failure names it
        for op, named in calls.items():
            if op in ("apply", "poll_failed"):
                named = {**named, "gen": generation}
            reply = store._call(op, **named)
            if op == "begin_poll":
                generation = reply["gen"]
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        assert len(keys) >= 8
        prefix = keys[0].decode().split("}")[0] + "}"
        assert {client.keyslot(key) for key in keys} == {client.keyslot(prefix)}
    finally:
        await gate.aclose()
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
        client.close()


# --- Sentinel ---------------------------------------------------------------------------------


@contextlib.contextmanager
def sentinel_setup() -> Iterator[tuple[Server, Server, list[Server]]]:
    """A master, its replica and three sentinels watching them (quorum 2)."""
    with servers() as (tmp, started):
        master = Server(tmp).start()
        started.append(master)
        replica = Server(tmp, options=[("replicaof", f"127.0.0.1 {master.port}")]).start()
        started.append(replica)
        deadline = time.monotonic() + 10
        while b"master_link_status:up" not in replica.client().execute_command("INFO replication"):
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        sentinels = []
        for _ in range(3):
            sentinel = Server(
                tmp,
                sentinel=True,
                options=[
                    ("sentinel monitor", f"capgate-main 127.0.0.1 {master.port} 2"),
                    ("sentinel down-after-milliseconds", "capgate-main 400"),
                    ("sentinel failover-timeout", "capgate-main 3000"),
                ],
            )
            started.append(sentinel.start())
            sentinels.append(sentinel)
        deadline = time.monotonic() + 15
        while not all(_sentinel_ready(s) for s in sentinels):
            assert time.monotonic() < deadline, "the sentinels did not find each other"
            time.sleep(0.1)
        yield master, replica, sentinels


def _sentinel_ready(sentinel: Server) -> bool:
    """Whether a sentinel knows the replica and the two other sentinels."""
    client = sentinel.client()
    try:
        master = client.execute_command("SENTINEL MASTER capgate-main")
        return int(master[b"num-slaves"]) == 1 and int(master[b"num-other-sentinels"]) == 2
    finally:
        client.close()


@pytest.mark.slow
async def test_sentinel_failover_fails_closed_and_grants_nothing_twice() -> None:
    """Through redis+sentinel://, the master killed mid-run: nothing is granted while it is
    down, the fleet resumes on the promoted replica, and no job meets a 429."""
    with sentinel_setup() as (master, replica, sentinels):
        url = (
            "redis+sentinel://"
            + ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
            + "/capgate-main/0"
        )
        namespace = _namespace()

        def store() -> RedisStore:
            return RedisStore(
                url, namespace=namespace, lease_ttl=2.0, recovery_grace=0.8, socket_timeout=0.5
            )

        async def kill_master() -> None:
            await anyio.sleep(1.0)
            master.stop()

        with structlog.testing.capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_master)
                fake = await _scenario(store, jobs=40)
        assert fake.creates == 40
        events = [e["event"] for e in logs]
        assert "capgate.store_unavailable" in events
        assert "capgate.store_recovered" in events
        role = replica.client().execute_command("ROLE")
        assert role[0] == b"master"


def test_sentinel_urls_are_parsed() -> None:
    """A redis+sentinel:// URL names the sentinels, the master and the db; bad ones raise."""
    store = RedisStore("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/main/3")
    assert store._sentinel == (
        [("127.0.0.1", 1), ("127.0.0.1", 2)],
        "main",
        3,
        {"password": "pw"},
        False,
    )
    assert "pw" not in repr(store)
    with pytest.raises(ValueError, match=r"^a sentinel URL ends with /<master name>\[/<db>\]$"):
        RedisStore("redis+sentinel://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"^a sentinel URL lists host:port pairs"):
        RedisStore("redis+sentinel://127.0.0.1/main")


# --- ACL ------------------------------------------------------------------------------------


async def test_an_acl_user_limited_to_the_fleet_can_run_it() -> None:
    """A user allowed only the namespace's keys and channels and the commands the scripts
    run (README's ACL SETUSER line) runs a fleet; one command fewer and it cannot."""
    with servers() as (tmp, started):
        server = Server(tmp).start()
        started.append(server)
        namespace = _namespace()
        admin = server.client()
        admin.execute_command(
            f"ACL SETUSER capgate on >s3cret resetkeys ~{namespace}:* resetchannels "
            f"&{namespace}:* -@all {ACL_COMMANDS}"
        )
        url = f"redis://capgate:s3cret@127.0.0.1:{server.port}/0"
        await _scenario(lambda: RedisStore(url, namespace=namespace, lease_ttl=2.0))
        admin.execute_command("ACL SETUSER capgate -hincrby")
        gate = CapacityGate(
            "fake-token", service="ltxstudio", store=RedisStore(url, namespace=namespace)
        )
        store = gate._engine.store
        with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
            store._call("sync", **store._dispatching, known_tick=0, waiters=[["w", 0, False]])
        await gate.aclose()
        admin.close()


# --- TLS -----------------------------------------------------------------------------------


def _certificates(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca, key, csr, cert = (tmp / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem"))
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "1", "-subj", "/CN=capgate-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)  # noqa: S603, S607
    return cert, key, ca


async def test_fleet_runs_over_tls() -> None:
    """rediss:// to a TLS-only server (certificate checked against a test CA) runs a fleet."""
    with servers() as (tmp, started):
        try:
            certs = _certificates(tmp)
        except (FileNotFoundError, subprocess.CalledProcessError):
            pytest.skip("needs openssl to make test certificates")
        server = Server(tmp, tls=certs)
        try:
            started.append(server.start())
        except RuntimeError as exc:
            pytest.skip(f"this redis-server has no TLS: {exc}")
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={certs[2]}"
        namespace = _namespace()
        await _scenario(lambda: RedisStore(url, namespace=namespace, lease_ttl=2.0))


# --- Valkey -----------------------------------------------------------------------------------


@pytest.mark.skipif(
    VALKEY_SERVER is None,
    reason="needs valkey-server (Debian 12 has no valkey package; Debian 13 has valkey-server)",
)
async def test_fleet_runs_on_valkey() -> None:
    """The fleet scenario on a valkey-server."""
    with servers() as (tmp, started):
        server = Server(tmp, binary=VALKEY_SERVER)
        started.append(server.start())
        namespace = _namespace()
        await _scenario(lambda: RedisStore(server.url, namespace=namespace, lease_ttl=2.0))
