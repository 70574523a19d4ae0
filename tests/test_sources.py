"""Every service's capacity source, end to end: the public API against the fake over
loopback HTTP, and each shape's parsing on its own.

Real sockets rule out trio's autojump clock, so the loopback tests run on the plain
backends with short, real intervals.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

import capgate
from capgate import CapacityGate
from capgate._config import _RETIRED_LOGGED
from capgate._services import SERVICES, get_service, service_for_url
from capgate._sources import parse_elapsed
from capgate.testing import FakeScheduler, serve

P = 0.05

#: account names as each service writes them
ACCOUNTS: dict[str, tuple[str, str]] = {
    "dreamina": ("US:a@x.io", "EU:b-c@x.io"),
    "mureka": ("12345678901234", "98765432109876"),
    "minimax-agent": ("67890", "67891"),
    "tempolor": ("u123", "user-with-dashes"),
    "riffusion": ("u123", "u456"),
    "minimax": ("acct-1", "acct2"),
}
CAPS = (2, 3)


def accounts_of(name: str) -> dict[str, int]:
    a, b = ACCOUNTS.get(name, ("a@x.io", "b-c@x.io"))
    return {a: CAPS[0], b: CAPS[1]}


def gate_options(name: str, caps: dict[str, int]) -> dict[str, Any]:
    """What a service needs beside service=: max_jobs= where no cap is read."""
    spec = get_service(name)
    if spec.needs_max_jobs or spec.default_max_jobs is not None:
        return {"max_jobs": dict(caps)}
    return {}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Plain backends with the real clock: sockets and a virtual clock do not mix."""
    return str(request.param)


@pytest.mark.anyio
@pytest.mark.loopback
@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_thirty_jobs_twelve_workers_no_429(name):
    """30 jobs through 12 workers over loopback HTTP: no 429, no account above its cap."""
    caps = accounts_of(name)
    fake = FakeScheduler(caps, service=name, job_duration=0.15)
    spec = fake.spec
    with serve(fake) as url:
        base = url[: len(url) - len(spec.source.path)].rstrip("/") if spec.source.path else url
        gate = CapacityGate(
            fake.token, service=name, base_url=base, poll_interval=P, **gate_options(name, caps)
        )
        create_url = base + "/" + spec.create_path
        headers = {"Authorization": f"Bearer {fake.token}"}
        done: list[str] = []
        async with aclosing(gate), httpx.AsyncClient(timeout=10) as client:

            async def create(account: str) -> httpx.Response:
                body = {spec.account_key: account, "duration": 0.15, "model": "m1"}
                return await client.post(create_url, json=body, headers=headers)

            jobs = iter(range(30))

            async def worker() -> None:
                for _ in jobs:
                    response = await gate.submit(create)
                    assert response.is_success
                    done.append(str(spec.job_id_from(response.json())))

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for _ in range(12):
                        tg.start_soon(worker)
    assert len(done) == 30
    assert fake.rejected_429 == 0
    assert all(fake.peak[a] <= cap for a, cap in caps.items()), fake.peak
    assert sum(fake.peak.values()) > len(caps)  # the slots were actually shared out


# --- the configuration ------------------------------------------------------------------


def test_no_service_is_a_type_error_listing_the_active_ones():
    """CapacityGate(token) without a service raises TypeError listing the active services."""
    active = ", ".join(sorted(n for n, s in SERVICES.items() if s.status == "active"))
    with pytest.raises(TypeError, match=r"^service= is required \(there is no default") as info:
        CapacityGate("t")
    assert active in str(info.value)
    assert "ltxstudio" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://proxy.example/v1/kling/scheduler/available", "kling"),
        ("https://proxy.example/v1/minimax/agent/jobs", "minimax-agent"),
        ("https://proxy.example/v1/minimax/scheduler/available", "minimax"),
        ("https://proxy.example/v2/pixverse", "pixverse"),
        ("https://proxy.example/v1/dreamina", "dreamina"),
        ("https://proxy.example/v1/google-flow", "google-flow"),
    ],
)
def test_service_is_inferred_from_a_known_path(url, name):
    """A base_url= or url= naming a known service path stands for service=."""
    assert service_for_url(httpx.URL(url).path) is get_service(name)


def test_base_url_names_the_service():
    """CapacityGate(token, base_url=…/v1/mureka) is a Mureka gate polling …/jobs."""
    gate = CapacityGate("t", base_url="http://127.0.0.1:9/v1/mureka")
    assert gate.service == "mureka"
    assert gate.url == "http://127.0.0.1:9/v1/mureka/jobs"


@pytest.mark.parametrize("name", ["minimax-agent", "google-flow"])
def test_max_jobs_is_required_where_no_cap_is_published(name):
    """minimax-agent and google-flow without max_jobs= fail with a ValueError naming it."""
    with pytest.raises(ValueError, match=rf"^{name} publishes no per-account cap: max_jobs= is"):
        CapacityGate("t", service=name, accounts=["a@x.io"])


def test_google_flow_needs_its_accounts():
    """google-flow reads no account list: accounts= (or a max_jobs mapping) is required."""
    with pytest.raises(ValueError, match=r"^google-flow has no account list the gate can read"):
        CapacityGate("t", service="google-flow", max_jobs=2)
    gate = CapacityGate("t", service="google-flow", max_jobs={"a@x.io": 2})
    assert gate._engine.config.accounts == ("a@x.io",)


def test_services_marks_the_retired_ones():
    """capgate.services() lists every service and marks ltxstudio and riffusion retired."""
    infos = {i.name: i for i in capgate.services()}
    assert set(infos) == set(SERVICES)
    assert {n for n, i in infos.items() if i.status == "retired"} == {"ltxstudio", "riffusion"}
    assert infos["ltxstudio"].retired_on == "2026-03-09"
    assert infos["kling"].status == "active"
    assert infos["kling"].retired_on is None
    assert infos["minimax-agent"].max_jobs_required
    assert infos["mureka"].default_max_jobs == 10
    assert "GET jobs" in infos["luma"].capacity
    assert type(infos["kling"]).__module__ == "capgate"


def test_a_retired_service_logs_once():
    """A gate on a retired service works and logs capgate.service_retired once."""
    _RETIRED_LOGGED.discard("riffusion")
    with capture_logs() as logs:
        CapacityGate("t", service="riffusion")
        CapacityGate("t", service="riffusion")
    retired = [e for e in logs if e["event"] == "capgate.service_retired"]
    assert retired == [
        {
            "event": "capgate.service_retired",
            "service": "riffusion",
            "retired_on": "2025-03-28",
            "log_level": "warning",
        }
    ]


# --- each shape ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("03:45", 225.0),
        ("1:02:03", 3723.0),
        (45, 45.0),
        ("45s", 45.0),
        ("1m 23s", 83.0),
        ("2m", 120.0),
        ("soon", None),
        (True, None),
        (-1, None),
    ],
)
def test_elapsed_formats(text, seconds):
    """elapsed reads MM:SS, an int of seconds, and "45s" / "1m 23s"."""
    assert parse_elapsed(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        1e300,
        10**400,
        float("nan"),
        float("inf"),
        7 * 86_400 + 1,
        "9" * 400 + ":00:00",
        "9" * 5000 + ":00:00",
        "9" * 400 + "s",
        "200:00:00",
    ],
)
def test_an_implausible_elapsed_is_unreadable(text):
    """Above a week, not finite, or too many digits: None, never an error or a huge age
    (the durations learnt from it would overflow the forecast)."""
    assert parse_elapsed(text) is None


@pytest.mark.parametrize(
    ("name", "job_id", "account"),
    [
        ("luma", "j0326v-u12345-email:a@x.io:6f1c-bot:luma", "a@x.io"),
        ("google-flow", "j1v-u12345-email:a-b@x.io-bot:google-flow", "a-b@x.io"),
        ("mureka", "j0121m-u777-a12345678901234-bot:mureka", "12345678901234"),
        ("dreamina", "j0223v-u12345-US:a@x.io:dreamina", "US:a@x.io"),
        ("minimax-agent", "p123456789-u12345-a67890-bot:minimax", "67890"),
        ("flowmusic", "job:1f-user:1234-a-b@x.io-bot:flowmusic", "a-b@x.io"),
    ],
)
def test_account_embedded_in_new_job_ids(name, job_id, account):
    """Each newer service's job id carries its account where the sheet shows it."""
    assert get_service(name).account_from_job_id(job_id) == account


def _fake_get(body_by_path: dict[str, Any]) -> Any:
    async def get(path: str) -> Any:
        return body_by_path[path]

    return get


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_mureka_documented_example_and_default_cap(anyio_backend):
    """Mureka's example: the account's total counts, its configured accounts are listed,
    and the cap is the prose's 10 without max_jobs=."""
    from capgate._sources import ReadContext

    spec = get_service("mureka")
    example = {
        "total": 1,
        "music": 1,
        "tts": 0,
        "accounts": {
            "12345678901234": {
                "total": 1,
                "music": 1,
                "tts": 0,
                "jobs": [
                    {
                        "jobid": "j0121-u777-a12345678901234-bot:mureka",
                        "verb": "music/create",
                        "elapsed": "00:24",
                    }
                ],
            }
        },
        "availableAccounts": ["98765432109876", "12345678901234"],
    }
    reading = await spec.source.read(_fake_get({"jobs": example}), ReadContext(spec, None, None), 0)
    rows = {r.account: (r.max_jobs, r.executing, r.free) for r in reading.accounts}
    assert rows == {"98765432109876": (10, 0, 10), "12345678901234": (10, 1, 9)}
    assert reading.executing[0].elapsed_seconds == 24.0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_dreamina_and_agent_and_luma_examples(anyio_backend):
    """Dreamina, MiniMax agent and Luma read their documented examples."""
    from capgate._sources import ReadContext

    dreamina = get_service("dreamina")
    got = await dreamina.source.read(
        _fake_get(
            {
                "accounts": {"US:a@x.io": {}},
                "accounts/US:a@x.io": {"account": "US:a@x.io", "maxJobs": 10},
                "scheduler": {
                    "executing": {
                        "US:a@x.io": [
                            {
                                "jobid": "j0223-u12345-US:a@x.io:dreamina",
                                "submitId": "s",
                                "model": "seedance-2.0",
                                "elapsedSeconds": 45,
                            }
                        ]
                    },
                    "total": 1,
                },
            }
        ),
        ReadContext(dreamina, None, None),
        0,
    )
    assert [(r.account, r.max_jobs, r.executing) for r in got.accounts] == [("US:a@x.io", 10, 1)]
    assert got.executing[0].elapsed_seconds == 45.0

    agent = get_service("minimax-agent")
    got = await agent.source.read(
        _fake_get(
            {
                "agent/jobs": {
                    "accounts": ["67890"],
                    "summary": {"67890": {"executing": 2}},
                    "executing": {
                        "67890": [
                            {"jobId": "p123456789-u12345-a67890-bot:minimax", "elapsed": "02:15"}
                        ]
                    },
                }
            }
        ),
        ReadContext(agent, 3, None),
        0,
    )
    assert [(r.account, r.max_jobs, r.executing, r.free) for r in got.accounts] == [
        ("67890", 3, 2, 1)
    ]

    luma = get_service("luma")
    got = await luma.source.read(
        _fake_get(
            {
                "accounts": {"a@x.io": {"email": "a@x.io", "concurrency": 4, "executing": 1}},
                "jobs": {
                    "executing": 1,
                    "jobs": [
                        {
                            "jobid": "j0326-u12345-email:a@x.io:u-bot:luma",
                            "type": "video",
                            "account": "a@x.io",
                            "model": "ray-v3-flash",
                            "created": "2026-03-26T14:05:30.123Z",
                        }
                    ],
                },
            }
        ),
        ReadContext(luma, None, None),
        0,
    )
    assert [(r.account, r.max_jobs, r.executing) for r in got.accounts] == [("a@x.io", 4, 1)]
    assert got.executing[0].started is not None


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_rare_endpoints_are_read_rarely(anyio_backend):
    """Luma's accounts are read at the first poll and after expire(), not on every poll."""
    fake = FakeScheduler({"a@x.io": 2}, service="luma")
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return await fake.handle(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        gate = CapacityGate(fake.token, service="luma", client=client, poll_interval=P)
        for _ in range(3):
            await gate.refresh()
        gate._engine.config.reading.cache.expire()  # what a 429 or a 596 does
        await gate.refresh()
        await gate.aclose()
    assert paths.count("/v1/luma/accounts") == 2
    assert paths.count("/v1/luma/jobs") == 4


# --- answers that must not read as free slots (each found by a review, failing before) -----

DREAMINA_CAPS = {"accounts": {"US:a@x.io": {}}, "accounts/US:a@x.io": {"maxJobs": 2}}
LUMA_CAPS = {"accounts": {"a@x.io": {"concurrency": 2}}}


async def _read(name: str, bodies: dict[str, Any], max_jobs: int | None = None) -> Any:
    from capgate._sources import ReadContext

    spec = get_service(name)
    return await spec.source.read(_fake_get(bodies), ReadContext(spec, max_jobs, None), 0)


def _rows(reading: Any) -> dict[str, tuple[int, int]]:
    return {r.account: (r.max_jobs, r.executing) for r in reading.accounts}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("body", [None, {}, {"message": "maintenance"}], ids=repr)
@pytest.mark.parametrize(
    ("name", "path", "caps"),
    [("dreamina", "scheduler", DREAMINA_CAPS), ("luma", "jobs", LUMA_CAPS)],
)
async def test_an_empty_or_foreign_jobs_answer_is_a_failed_poll(
    anyio_backend, name, path, caps, body
):
    """Not "nothing running", which freed every slot of a full account: the documented idle
    answers still hold their key (``{"executing":{},"total":0}``)."""
    with pytest.raises(capgate.PollError, match=r"empty answer|in the answer"):
        await _read(name, {**caps, path: body})


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_unreadable_job_row_still_counts_on_its_account(anyio_backend):
    """A row with no job id runs all the same: Dreamina's group names its account, Luma's
    row its ``account``."""
    dreamina = await _read(
        "dreamina",
        {**DREAMINA_CAPS, "scheduler": {"executing": {"US:a@x.io": [{"jobid": "j1"}, {}]}}},
    )
    luma = await _read(
        "luma",
        {
            **LUMA_CAPS,
            "jobs": {"jobs": [{"jobid": "j1", "account": "a@x.io"}, {"account": "a@x.io"}]},
        },
    )
    assert _rows(dreamina) == {"US:a@x.io": (2, 2)}
    assert _rows(luma) == {"a@x.io": (2, 2)}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_job_on_no_readable_account_counts_on_every_account(anyio_backend):
    luma = await _read(
        "luma",
        {
            "accounts": {"a@x.io": {"concurrency": 2}, "b@x.io": {"concurrency": 2}},
            "jobs": {"jobs": [{"jobid": "j1"}]},  # no account, none in the id either
        },
    )
    assert _rows(luma) == {"a@x.io": (2, 1), "b@x.io": (2, 1)}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_top_level_count_above_the_rows_counts_on_every_account(anyio_backend):
    """Dreamina's ``total`` and Luma's ``executing`` say jobs run that no row shows."""
    dreamina = await _read(
        "dreamina", {**DREAMINA_CAPS, "scheduler": {"executing": {}, "total": 1}}
    )
    luma = await _read("luma", {**LUMA_CAPS, "jobs": {"executing": 2, "jobs": []}})
    assert _rows(dreamina) == {"US:a@x.io": (2, 1)}
    assert _rows(luma) == {"a@x.io": (2, 2)}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("name", "body", "max_jobs"),
    [
        (
            "dreamina",
            {**DREAMINA_CAPS, "scheduler": {"executing": {"US:a@x.io": {"jobs": []}}}},
            None,
        ),
        (
            "mureka",
            {"jobs": {"accounts": {"123": "10 running"}, "availableAccounts": ["123"]}},
            None,
        ),
        ("minimax-agent", {"agent/jobs": {"summary": {"67890": 3}, "executing": {}}}, 3),
        ("minimax-agent", {"agent/jobs": {"executing": {"67890": "3 jobs"}}}, 3),
    ],
    ids=["dreamina-group", "mureka-group", "agent-summary", "agent-group"],
)
async def test_an_account_entry_of_the_wrong_type_leaves_the_account_out(
    anyio_backend, name, body, max_jobs
):
    """Not 0 running: with no row the account is never granted, and the skip is logged."""
    reading = await _read(name, body, max_jobs)
    assert reading.accounts == []
    assert reading.skipped


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("max_jobs", [None, 2])
async def test_a_dreamina_account_gone_from_useapi_leaves_the_others_going(
    anyio_backend, max_jobs
):
    """Its ``GET accounts/<account>`` answers 404: that account has no slot, a local
    ``max_jobs=`` notwithstanding; before, the failure stopped every poll."""
    from capgate._sources import ReadContext

    spec = get_service("dreamina")
    bodies = {
        "accounts/US:a@x.io": {"maxJobs": 2},
        "scheduler": {"executing": {}, "total": 0},
    }

    async def get(path: str) -> Any:
        if path == "accounts/US:gone@x.io":
            raise capgate.PollError("dreamina: HTTP 404: Account not found", status_code=404)
        return bodies[path]

    context = ReadContext(spec, max_jobs, ("US:a@x.io", "US:gone@x.io"))
    reading = await spec.source.read(get, context, 0)
    assert _rows(reading) == {"US:a@x.io": (2, 0), "US:gone@x.io": (0, 0)}
    assert [r.free for r in reading.accounts] == [2, 0]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_flow_music_with_no_account_is_a_failed_poll(anyio_backend):
    """Its ``GET accounts`` lists every configured account, so ``{}`` is a setup to fix:
    before, it read as "all busy" and waiters waited out their timeouts (for ever without
    one) with no word of why."""
    with pytest.raises(capgate.PollError, match=r"^flowmusic: GET accounts lists no account$"):
        await _read("flowmusic", {"accounts": {}})
