"""The fake speaks useapi: each request useapi's example scripts make, and its answer's shape.

The scripts are useapi's own (GitHub ``useapi/kling-api`` ``text-to-video/kling.mjs``,
``useapi/minimax-api`` ``video/videos.mjs``, ``useapi/pixverse-api`` ``video/pixverse.mjs``,
the TemPolor part of ``useapi/ai-music-comparison``); the facts are in
``shared/reference/useapi-scheduler.md``. Each test makes the request a script makes, as it
makes it, and checks the fields that script reads.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import anyio
import httpx
import pytest

from capgate.testing import FakeScheduler

pytestmark = pytest.mark.anyio

TOKEN = "fake-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ME, OTHER = "me@example.com", "other@example.com"


def _client(fake: FakeScheduler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url, headers=AUTH)


# --- Kling (kling.mjs) ----------------------------------------------------------------------


async def test_kling_accounts_list_each_email():
    """GET accounts: an object whose values carry each account's email (kling.mjs reads
    Object.values(accounts)[].email)."""
    fake = FakeScheduler({ME: 2, OTHER: 1}, service="kling")
    async with _client(fake) as client:
        response = await client.get("/accounts")
    assert response.status_code == 200
    assert [a["email"] for a in response.json().values()] == [ME, OTHER]


async def test_kling_create_answers_a_numeric_task_id():
    """POST videos/text2video answers 200 with the job id at task.id, a number."""
    fake = FakeScheduler({ME: 2}, service="kling")
    body = {"email": ME, "model_name": "kling-v1-6", "prompt": "a cat", "duration": "5"}
    async with _client(fake) as client:
        response = await client.post("/videos/text2video", json=body)
    assert response.status_code == 200
    task_id = response.json()["task"]["id"]
    assert isinstance(task_id, int)
    assert fake.jobs[str(task_id)].account == ME


@pytest.mark.trio_only
async def test_kling_task_runs_then_succeeds_with_a_resource():
    """GET tasks/<id>?email=: processing and not final, then 'succeed' with
    works[0].resource.resource and works[0].workId; assets/download gives cdnUrl."""
    fake = FakeScheduler({ME: 1}, service="kling", job_duration=30)
    async with _client(fake) as client:
        created = await client.post("/videos/text2video", json={"email": ME, "prompt": "x"})
        task_id = created.json()["task"]["id"]
        running = (await client.get(f"/tasks/{task_id}", params={"email": ME})).json()
        await anyio.sleep(30)
        done = (await client.get(f"/tasks/{task_id}", params={"email": ME})).json()
        work = done["works"][0]
        download = await client.get(
            "/assets/download",
            params={"email": ME, "workIds": str(work["workId"]), "fileTypes": "MP4"},
        )
        media = await client.get(work["resource"]["resource"], headers={"Authorization": ""})
    assert (running["status_name"], running["status_final"]) == ("processing", False)
    assert (done["status_name"], done["status_final"]) == ("succeed", True)
    assert download.json()["cdnUrl"].startswith("https://api.useapi.net/fake-cdn/")
    assert (media.status_code, media.headers["content-type"]) == (200, "video/mp4")


@pytest.mark.trio_only
async def test_kling_failed_task_is_final_and_not_succeed():
    """A job that fails (fail_rate=1) reads final with status_name 'failed' and no works."""
    fake = FakeScheduler({ME: 1}, service="kling", job_duration=5, fail_rate=1.0)
    async with _client(fake) as client:
        task_id = (await client.post("/videos/text2video", json={"email": ME})).json()["task"]["id"]
        await anyio.sleep(5)
        task = (await client.get(f"/tasks/{task_id}")).json()
    assert (task["status_name"], task["status_final"], task["works"]) == ("failed", True, [])


async def test_kling_full_account_answers_429():
    """A create on a full account answers 429 with useapi's error body (kling.mjs retries)."""
    fake = FakeScheduler({ME: 1}, service="kling")
    async with _client(fake) as client:
        await client.post("/videos/text2video", json={"email": ME})
        busy = await client.post("/videos/text2video", json={"email": ME})
    assert busy.status_code == 429
    assert busy.json() == {"error": f"Account {ME} is busy executing maximum jobs"}


# --- MiniMax (videos.mjs) -------------------------------------------------------------------


async def test_minimax_accounts_support_video():
    """GET accounts: values with supportVideo and no error (videos.mjs keeps those)."""
    fake = FakeScheduler({"111": 1}, service="minimax")
    async with _client(fake) as client:
        accounts = (await client.get("/accounts")).json()
    assert [(a["account"], a["supportVideo"], "error" in a) for a in accounts.values()] == [
        ("111", True, False)
    ]


async def test_minimax_upload_answers_a_file_id():
    """POST files/?account= with image bytes answers fileID."""
    fake = FakeScheduler({"111": 1}, service="minimax")
    async with _client(fake) as client:
        response = await client.post(
            "/files/",
            params={"account": "111"},
            content=b"\xff\xd8",
            headers={"Content-Type": "image/jpeg"},
        )
    assert response.status_code == 200
    assert response.json()["fileID"].startswith("user:4242-minimax:111-file:")


async def test_minimax_scheduler_lists_free_accounts_by_account_key():
    """scheduler/available lists available[].account and .available, and executing[]."""
    fake = FakeScheduler({"111": 1, "222": 2}, service="minimax")
    async with _client(fake) as client:
        await client.post("/videos/create", json={"account": "111", "prompt": "x"})
        body = (await client.get("/scheduler/available")).json()
    assert [(a["account"], a["available"]) for a in body["available"]] == [("222", 2)]
    assert len(body["executing"]) == 1


@pytest.mark.trio_only
async def test_minimax_video_runs_then_completes():
    """POST videos/create answers videoId; GET videos/<videoId> is not final (with a
    percent) while running, then final 'completed' with downloadURL and videoURL."""
    fake = FakeScheduler({"111": 1}, service="minimax", job_duration=40)
    async with _client(fake) as client:
        created = await client.post(
            "/videos/create", json={"account": "111", "prompt": "x", "duration": 8}
        )
        video_id = created.json()["videoId"]
        await anyio.sleep(10)
        running = (await client.get(f"/videos/{video_id}")).json()
        await anyio.sleep(30)
        done = (await client.get(f"/videos/{video_id}")).json()
    assert video_id.startswith("user:4242-minimax:111-video:")
    assert (running["statusFinal"], running["statusLabel"], running["percent"]) == (
        False,
        "processing",
        25,
    )
    assert (done["status"], done["statusLabel"], done["statusFinal"]) == (2, "completed", True)
    assert done["downloadURL"] == done["videoURL"]


@pytest.mark.parametrize("status", [502, 504, 412, 596])
async def test_minimax_account_failures_read_like_useapi(status):
    """fail_account(): the create answers that status with {"error": text, "code": status},
    plain text (no Python repr)."""
    fake = FakeScheduler({"111": 1}, service="minimax")
    fake.fail_account("111", status)
    async with _client(fake) as client:
        response = await client.post("/videos/create", json={"account": "111"})
    body = response.json()
    assert (response.status_code, body["code"]) == (status, status)
    assert "'" not in body["error"]
    assert body["error"]


# --- PixVerse (pixverse.mjs) ----------------------------------------------------------------


async def test_pixverse_answers_under_v2_only():
    """PixVerse lives under /v2/pixverse: the same path under /v1 is a JSON 404."""
    fake = FakeScheduler({ME: 1}, service="pixverse")
    async with httpx.AsyncClient(transport=fake.transport(), headers=AUTH) as client:
        v2 = await client.get("https://api.useapi.net/v2/pixverse/accounts")
        v1 = await client.get("https://api.useapi.net/v1/pixverse/accounts")
        v1_poll = await client.get("https://api.useapi.net/v1/pixverse/scheduler/available")
    assert v2.status_code == 200
    assert (v1.status_code, v1_poll.status_code) == (404, 404)
    assert v1.json() == {"error": "Path /v1/pixverse/accounts not found", "code": 404}


async def test_pixverse_accounts_are_keyed_by_email():
    """GET accounts: an object keyed by email (pixverse.mjs checks accounts[email])."""
    fake = FakeScheduler({ME: 1, OTHER: 2}, service="pixverse")
    async with _client(fake) as client:
        accounts = (await client.get("/accounts")).json()
    assert list(accounts) == [ME, OTHER]


async def test_pixverse_upload_answers_a_path():
    """POST files/?email= answers result[0].path (used as first_frame_path), named with the
    uploaded image's type."""
    fake = FakeScheduler({ME: 1}, service="pixverse")
    async with _client(fake) as client:
        response = await client.post(
            "/files/",
            params={"email": ME},
            content=b"RIFF",
            headers={"Content-Type": "image/webp"},
        )
    path = response.json()["result"][0]["path"]
    assert path.startswith("upload/")
    assert path.endswith(".webp")


@pytest.mark.trio_only
async def test_pixverse_video_is_404_while_processing_then_completed():
    """POST videos/create answers video_id; GET videos/<video_id> answers 404 while the
    video is processing (as documented), then COMPLETED, final, with a url."""
    fake = FakeScheduler({ME: 1}, service="pixverse", job_duration=20)
    body = {"model": "v6", "email": ME, "prompt": "x", "duration": 15, "aspect_ratio": "16:9"}
    async with _client(fake) as client:
        video_id = (await client.post("/videos/create", json=body)).json()["video_id"]
        processing = await client.get(f"/videos/{video_id}")
        await anyio.sleep(20)
        done = (await client.get(f"/videos/{video_id}")).json()
    assert processing.status_code == 404
    assert video_id.startswith(f"user:4242-pixverse:{ME}-video:")
    assert (done["video_status_name"], done["video_status_final"]) == ("COMPLETED", True)
    assert done["url"].endswith(".mp4")


# --- TemPolor (the music comparison script) -------------------------------------------------


@pytest.mark.parametrize("path", ["music/song", "music/instrumental"])
async def test_tempolor_create_without_account_answers_jobs(path):
    """POST music/song and music/instrumental without user_id: useapi picks an account
    with room, and the answer lists the job in jobs[]."""
    fake = FakeScheduler({"u1": 1, "u2": 3}, service="tempolor")
    async with _client(fake) as client:
        response = await client.post(f"/{path}", json={"model_song": "v4.8", "prompt": "x"})
    jobs = response.json()["jobs"]
    assert response.status_code == 200
    assert [fake.jobs[j].account for j in jobs] == ["u2"]  # the most free slots


@pytest.mark.trio_only
async def test_tempolor_music_generates_then_completes_then_downloads():
    """GET music/<job>: GENERATING, then COMPLETED and final; music/download/<job> is 404
    until then, then a url."""
    fake = FakeScheduler({"u1": 1}, service="tempolor", job_duration=60)
    async with _client(fake) as client:
        job = (await client.post("/music/song", json={"user_id": "u1"})).json()["jobs"][0]
        running = (await client.get(f"/music/{job}")).json()
        early = await client.get(f"/music/download/{job}", params={"file_format": "mp3"})
        await anyio.sleep(60)
        done = (await client.get(f"/music/{job}")).json()
        late = await client.get(f"/music/download/{job}", params={"file_format": "mp3"})
    assert (running["status_name"], running["status_final"]) == ("GENERATING", False)
    assert (done["status_name"], done["status_final"]) == ("COMPLETED", True)
    assert (early.status_code, late.status_code) == (404, 200)
    assert late.json()["url"].endswith(".mp3")


# --- what every service's fake does ---------------------------------------------------------


async def test_create_without_account_when_all_are_full_is_429():
    """With no account named and none with room, the create answers 429."""
    fake = FakeScheduler({"u1": 1}, service="tempolor")
    async with _client(fake) as client:
        await client.post("/music/song", json={})
        full = await client.post("/music/song", json={})
    assert full.status_code == 429
    assert fake.rejected_429 == 1


async def test_the_picker_skips_failing_accounts():
    """A create without an account never lands on an account that fails (596…)."""
    fake = FakeScheduler({"u1": 5, "u2": 1}, service="tempolor")
    fake.fail_account("u1", 596)
    job = await fake.create()
    assert job.account == "u2"


async def test_a_body_duration_is_the_video_length_not_the_running_time():
    """A create body's duration (the length of the video asked for) does not set how long
    the job runs: the fake's job_duration does."""
    fake = FakeScheduler({"111": 1}, service="minimax", job_duration=90)
    async with _client(fake) as client:
        created = await client.post("/videos/create", json={"account": "111", "duration": 6})
    job = fake.jobs[created.json()["videoId"]]
    assert job.end - job.start == 90


async def test_runtime_header_sets_one_jobs_running_time():
    """RUNTIME_HEADER (the fake's own control, for harnesses) sets that job's running time."""
    fake = FakeScheduler({ME: 1}, service="kling", job_duration=90)
    async with _client(fake) as client:
        created = await client.post(
            "/videos/text2video", json={"email": ME}, headers={fake.RUNTIME_HEADER: "12.5"}
        )
    job = fake.jobs[str(created.json()["task"]["id"])]
    assert job.end - job.start == 12.5


@pytest.mark.trio_only
async def test_started_is_wall_clock_iso_time():
    """executing[].started is the wall-clock time the job started, in ISO form."""
    noon = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
    fake = FakeScheduler({"u1": 2}, service="tempolor", wall_clock=lambda: noon)
    fake.wall_time(anyio.current_time())  # the wall clock is read here: noon is now
    await anyio.sleep(90)
    await fake.create("u1")
    async with _client(fake) as client:
        row = (await client.get("/scheduler/available")).json()["executing"][0]
    assert row["started"] == "2026-12-04T12:01:30Z"


async def test_trailing_slash_is_the_same_path():
    """A documented path answers the same with one trailing slash (useapi's scripts write
    files/?… and accounts alike)."""
    fake = FakeScheduler({ME: 1}, service="kling")
    async with _client(fake) as client:
        plain = await client.get("/accounts")
        slashed = await client.get("/accounts/")
    assert plain.json() == slashed.json()


async def test_unknown_paths_and_jobs_are_json_404s():
    """An undocumented path, or an unknown job, is useapi's JSON 404 (no Python repr)."""
    fake = FakeScheduler({ME: 1}, service="kling")
    async with _client(fake) as client:
        jobs = await client.post("/jobs", json={"email": ME})
        task = await client.get("/tasks/424242")
    assert jobs.status_code == task.status_code == 404
    assert jobs.json() == {"error": "POST /v1/kling/jobs not found", "code": 404}
    assert task.json() == {"error": "Job 424242 not found", "code": 404}


async def test_unknown_account_is_a_400_naming_the_configured_ones():
    """A create for an account that is not configured is a 400 in plain words."""
    fake = FakeScheduler({ME: 1}, service="kling")
    async with _client(fake) as client:
        response = await client.post("/videos/text2video", json={"email": "zz@x.io"})
    assert response.status_code == 400
    assert response.json() == {
        "error": f"Account zz@x.io not found; configured: {ME}",
        "code": 400,
    }


# --- replyUrl ---------------------------------------------------------------------------------


def _receiver(received: list[tuple[str, Any]]) -> httpx.AsyncClient:
    async def handler(request: httpx.Request) -> httpx.Response:
        received.append((str(request.url), httpx.Response(200, content=request.content).json()))
        return httpx.Response(204)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.trio_only
async def test_reply_url_gets_the_get_job_answer_when_the_job_ends():
    """A job's replyUrl is POSTed the service's "get job" answer (and replyRef) when the
    job ends, once."""
    fake = FakeScheduler({ME: 1}, service="kling", job_duration=10)
    received: list[tuple[str, Any]] = []
    async with anyio.create_task_group() as tg, _receiver(received) as hooks:
        tg.start_soon(fake.run_callbacks, hooks)
        job = await fake.create(ME, reply_url="http://127.0.0.1:9/hook", reply_ref="r-1")
        await anyio.sleep(10)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    url, body = received[0]
    assert len(received) == 1
    assert url == "http://127.0.0.1:9/hook"
    assert (body["id"], body["status_name"], body["replyRef"]) == (job.wire_id, "succeed", "r-1")


@pytest.mark.trio_only
async def test_account_level_reply_url_takes_jobs_without_their_own():
    """POST /v2/account {replyUrl} sets where jobs without a replyUrl are reported."""
    fake = FakeScheduler({"u1": 1}, service="tempolor", job_duration=10)
    received: list[tuple[str, Any]] = []
    async with anyio.create_task_group() as tg, _receiver(received) as hooks:
        async with httpx.AsyncClient(transport=fake.transport(), headers=AUTH) as client:
            set_it = await client.post(
                "https://api.useapi.net/v2/account", json={"replyUrl": "http://127.0.0.1:9/all"}
            )
        tg.start_soon(fake.run_callbacks, hooks)
        job = await fake.create("u1")
        await anyio.sleep(10)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert set_it.json() == {"replyUrl": "http://127.0.0.1:9/all"}
    assert received == [
        (
            "http://127.0.0.1:9/all",
            {
                "job_id": job.job_id,
                "status": 30,
                "status_name": "COMPLETED",
                "status_final": True,
                "progress": 100,
            },
        )
    ]


# --- outside load -----------------------------------------------------------------------------


@pytest.mark.trio_only
async def test_keep_busy_holds_slots_with_outside_jobs():
    """keep_busy(account, n): n of its slots run outside jobs back to back, so only the rest
    are free, now and after the first outside jobs end."""
    fake = FakeScheduler({ME: 3}, service="kling", job_duration=30)
    fake.keep_busy(ME, 2)
    async with _client(fake) as client:
        first = (await client.get("/scheduler/available")).json()["available"]
        await anyio.sleep(45)
        later = (await client.get("/scheduler/available")).json()["available"]
    assert [r["available"] for r in first] == [r["available"] for r in later] == [1]


# --- Google Flow (google-flow.mjs) and Flow Music (flowmusic.mjs) ----------------------------


@pytest.mark.parametrize(
    ("service", "mode", "status", "fields"),
    [
        ("google-flow", None, 200, {"jobId"}),
        ("google-flow", "async", 201, {"jobid"}),
        ("flowmusic", None, 200, {"jobid", "status:completed", "created_at"}),
        ("flowmusic", "async", 201, {"jobid", "status:pending", "created_at"}),
    ],
)
async def test_sync_create_services_answer_as_documented(service, mode, status, fields):
    """A sync create answers when the job ends (200), an async one at once (201); Google
    Flow names the id ``jobId`` when sync and ``jobid`` when async, Flow Music answers the
    job with its status. Before, every create answered 200, ``jobid``, "started"."""
    fake = FakeScheduler({ME: 1}, service=service, job_duration=0.2)
    body: dict[str, Any] = {"email": ME, "prompt": "a cat"}
    if mode is not None:
        body["mode"] = mode
    async with _client(fake) as client:
        response = await client.post(f"/{fake.spec.create_path}", json=body)
    assert response.status_code == status
    answer = response.json()
    assert answer["email"] == ME
    for field in fields:
        key, _, value = field.partition(":")
        assert key in answer
        if value:
            assert answer[key] == value
