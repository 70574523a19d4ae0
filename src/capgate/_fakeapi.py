"""What a fake useapi.net service answers besides its capacity: create, job status, accounts.

A :class:`FakeApi` describes one service's job endpoints the way useapi's own example
scripts use them (``shared/reference/useapi-scheduler.md``, section "What useapi's own
example scripts send and read"): the create paths, the create answer holding the new job's
id, the job-status ``GET`` (running, then completed or failed), ``GET accounts``, the
uploads a script makes before it creates, and the body POSTed to ``replyUrl`` when a job
ends. A :class:`~capgate._services.Service` entry names its ``FakeApi`` the way it names its
capacity source, and :class:`capgate.testing.FakeScheduler` routes requests here, so the
fake knows no service by name.

Where the docs show a field, the fake writes it as documented; every other field, and every
answer the docs do not show, is a guess, said so in ``guesses`` (shown in the README) and in
the comments marked GUESS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .testing import FakeJob, FakeScheduler

__all__ = [
    "Answer",
    "Call",
    "FakeApi",
    "KlingApi",
    "LtxStudioApi",
    "MinimaxApi",
    "PixverseApi",
    "TempolorApi",
]


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: a status and a JSON body (``None``: no body)."""

    status: int
    body: Any = None


@dataclass(frozen=True)
class Call:
    """What a route needs of the request it answers.

    Attributes:
        fake: The simulation.
        now: The fake's time (``anyio.current_time()``).
        origin: ``scheme://host[:port]`` the client used, for the media links it answers.
        query: The query parameters.
        content_type: The request's ``Content-Type`` (an upload's image type).
        asynchronous: A create that asked ``"mode": "async"`` of a service whose creates
            answer when the job ends by default (Flow Music, Google Flow).
    """

    fake: FakeScheduler
    now: float
    origin: str
    query: Mapping[str, str]
    content_type: str = ""
    asynchronous: bool = False  # a create with ``"mode": "async"`` (sync-create services)


def not_found(what: str) -> Answer:
    """useapi's 404 body (``{"error": …, "code": 404}``, as its documented 404s read)."""
    return Answer(404, {"error": f"{what} not found", "code": 404})


def unknown_account(call: Call, key: str) -> Answer | None:
    """The 400 an upload naming (in query parameter ``key``) an account the fake does not
    have gets; ``None`` for a configured one."""
    account = call.query.get(key, "")
    if account in call.fake.max_jobs:
        return None
    return Answer(400, {"error": f"Account {account} not configured", "code": 400})


def media_url(call: Call, job: FakeJob, ext: str = "mp4") -> str:
    """A link to the job's result on the fake's own stand-in for the provider's CDN (which
    needs no token, like the signed links the real services hand out)."""
    safe = "".join(c if c.isalnum() else "_" for c in job.job_id)
    return f"{call.origin}/fake-cdn/{safe}.{ext}"


class FakeApi:
    """The job endpoints of a service with no documented job status (the default).

    Its create answer is ``{<job id key>: id, <account key>: account, "status": "started"}``
    and its ``replyUrl`` body ``{<job id key>, <account key>, "status": "completed" |
    "failed"}``: both guesses, for the services whose scripts read only the job id.
    """

    #: create paths besides ``Service.create_path`` (TemPolor's ``music/instrumental``)
    more_create_paths: tuple[str, ...] = ()
    #: what the docs leave open, in words (the README's table)
    guesses: str = "create answer beyond the job id; callback body"

    def create_answer(self, call: Call, job: FakeJob) -> Any:
        spec = call.fake.spec
        key = spec.job_id_keys[0]
        return {key: job.wire_id, spec.account_key: job.account, "status": "started"}

    def status(self, call: Call, job: FakeJob) -> Answer | None:
        """The job-status answer for ``job``, or ``None`` when the service has none."""
        return None

    def status_job_id(self, relative: str) -> str | None:
        """The job id in a job-status path, or ``None`` when ``relative`` is not one."""
        return None

    def callback_body(self, call: Call, job: FakeJob) -> Any:
        """What useapi POSTs to ``replyUrl`` when ``job`` ends: the service's "get job"
        answer where it has one (documented), else a small summary (a guess)."""
        answer = self.status(call, job)
        if answer is not None and answer.status == 200 and isinstance(answer.body, dict):
            body = dict(answer.body)
        else:
            spec = call.fake.spec
            body = {
                spec.job_id_keys[0]: job.wire_id,
                spec.account_key: job.account,
                "status": "failed" if job.failed else "completed",
            }
        if job.reply_ref is not None:
            body["replyRef"] = job.reply_ref
        return body

    def accounts(self, call: Call) -> Any:
        """``GET accounts``: ``None`` when this service's fake does not answer it."""
        return None

    def get(self, call: Call, relative: str) -> Answer | None:
        """Other documented ``GET`` routes (result links); ``None`` for no route."""
        return None

    def post(self, call: Call, relative: str, body: bytes) -> Answer | None:
        """Other documented ``POST`` routes (file uploads); ``None`` for no route."""
        return None

    def _job(self, call: Call, job_id: str) -> FakeJob | None:
        job = call.fake.jobs.get(job_id)
        return None if job is None or job.outside else job


def _prefixed_id(relative: str, prefix: str) -> str | None:
    if not relative.startswith(prefix):
        return None
    rest = relative[len(prefix) :]
    return rest if rest and "/" not in rest else None


class KlingApi(FakeApi):
    """Kling: ``GET accounts``, ``POST videos/text2video`` answering ``task.id`` (a number),
    ``GET tasks/<id>`` (``status_name``, ``status_final``, ``works[].resource.resource``,
    ``works[].workId``) and ``GET assets/download`` (``cdnUrl``), as useapi's
    ``kling.mjs`` reads them."""

    guesses = (
        "the status numbers (5 submitted, 10 processing, 99 succeed, 50 failed), every field "
        "but task.id in the create answer, the accounts object's fields beyond email"
    )

    def create_answer(self, call: Call, job: FakeJob) -> Any:
        # documented: task.id; GUESS: the rest mirrors the task's status fields
        return {
            "task": {"id": job.wire_id, "status": 5, "status_name": "submitted"},
            "status": 5,
            "status_name": "submitted",
            "status_final": False,
            "works": [],
        }

    def status_job_id(self, relative: str) -> str | None:
        return _prefixed_id(relative, "tasks/")

    def status(self, call: Call, job: FakeJob) -> Answer:
        works: list[dict[str, Any]] = []
        if job.end > call.now:
            status, name, final = 10, "processing", False
        elif job.failed:
            status, name, final = 50, "failed", True
        else:
            status, name, final = 99, "succeed", True
            works.append({"workId": job.wire_id, "resource": {"resource": media_url(call, job)}})
        body: dict[str, Any] = {
            "id": job.wire_id,
            "status": status,
            "status_name": name,
            "status_final": final,
            "works": works,
        }
        if job.failed and final:
            body["message"] = "generation failed (simulated)"
        return Answer(200, body)

    def accounts(self, call: Call) -> Any:
        # the script reads Object.values(accounts)[].email; GUESS: keyed by email, maxJobs
        return {a: {"email": a, "maxJobs": n} for a, n in call.fake.max_jobs.items()}

    def get(self, call: Call, relative: str) -> Answer | None:
        if relative != "assets/download":
            return None
        work = call.query.get("workIds", "")
        job = self._job(call, work)
        if job is None or job.end > call.now or job.failed:
            return not_found(f"Work {work}")
        return Answer(200, {"cdnUrl": media_url(call, job)})


class MinimaxApi(FakeApi):
    """MiniMax: ``GET accounts`` (``supportVideo``), ``POST videos/create`` answering
    ``videoId``, ``GET videos/<videoId>`` (documented: ``status``, ``statusLabel``,
    ``statusFinal``, ``percent``, ``videoURL``, ``downloadURL``) and ``POST files``
    (``fileID``), as useapi's ``videos.mjs`` reads them."""

    guesses = (
        "status 1 'processing' and 5 'failed' (the docs list 2 'completed'), every field but "
        "videoId in the create answer, the accounts object's fields"
    )

    def create_answer(self, call: Call, job: FakeJob) -> Any:
        # documented: videoId; GUESS: the rest
        return {"videoId": job.job_id, "status": 0, "statusLabel": "pending", "statusFinal": False}

    def status_job_id(self, relative: str) -> str | None:
        return _prefixed_id(relative, "videos/")

    def status(self, call: Call, job: FakeJob) -> Answer:
        if job.end > call.now:
            done = (call.now - job.start) / max(job.end - job.start, 1e-9)
            status, label, final, percent = 1, "processing", False, min(99, int(100 * done))
        elif job.failed:
            status, label, final, percent = 5, "failed", True, 0
        else:
            status, label, final, percent = 2, "completed", True, 100
        body: dict[str, Any] = {
            "id": job.job_id.rsplit(":", 1)[-1],
            "videoId": job.job_id,
            "status": status,
            "statusLabel": label,
            "statusFinal": final,
            "percent": percent,
        }
        if final and not job.failed:
            body["videoURL"] = media_url(call, job)
            body["downloadURL"] = media_url(call, job)
        return Answer(200, body)

    def accounts(self, call: Call) -> Any:
        # the script keeps Object.values(accounts) with supportVideo and no error (GUESS: the
        # other fields)
        return {
            a: {"account": a, "supportVideo": True, "maxJobs": n}
            for a, n in call.fake.max_jobs.items()
        }

    def post(self, call: Call, relative: str, body: bytes) -> Answer | None:
        if relative != "files":
            return None
        refused = unknown_account(call, "account")
        if refused is not None:
            return refused
        n = call.fake.next_number()
        account = call.query["account"]
        return Answer(200, {"fileID": f"user:4242-minimax:{account}-file:{n}"})


class PixverseApi(FakeApi):
    """PixVerse (``v2``): ``GET accounts`` (keyed by email), ``POST videos/create``
    answering ``video_id``, ``GET videos/<video_id>`` (404 while the video is processing,
    then ``video_status_name``, ``video_status_final``, ``url``) and ``POST files``
    (``result[].path``), as useapi's ``pixverse.mjs`` reads them."""

    guesses = (
        "the 404 body while processing, 'FAILED' with no url for a failed video, every field "
        "but video_id in the create answer, the accounts object's fields beyond its keys"
    )

    def create_answer(self, call: Call, job: FakeJob) -> Any:
        # documented: video_id (image creates answer image_id; the fake creates videos)
        return {"video_id": job.job_id}

    def status_job_id(self, relative: str) -> str | None:
        return _prefixed_id(relative, "videos/")

    def status(self, call: Call, job: FakeJob) -> Answer:
        if job.end > call.now:
            # documented: PixVerse answers 404 while a video is still processing
            return not_found(f"Video {job.job_id}")
        # documented status map: 1 COMPLETED (final); GUESS: 8 FAILED
        body: dict[str, Any] = {
            "video_id": job.job_id,
            "video_status": 8 if job.failed else 1,
            "video_status_name": "FAILED" if job.failed else "COMPLETED",
            "video_status_final": True,
        }
        if not job.failed:
            body["url"] = media_url(call, job)
        return Answer(200, body)

    def accounts(self, call: Call) -> Any:
        # the script reads the keys (emails); GUESS: the fields
        return {a: {"email": a, "maxJobs": n} for a, n in call.fake.max_jobs.items()}

    def post(self, call: Call, relative: str, body: bytes) -> Answer | None:
        if relative != "files":
            return None
        refused = unknown_account(call, "email")
        if refused is not None:
            return refused
        n = call.fake.next_number()
        kind = call.content_type.partition(";")[0].strip()
        ext = kind.removeprefix("image/") if kind.startswith("image/") else "png"
        return Answer(200, {"result": [{"path": f"upload/fake-{n}.{ext}", "size": len(body)}]})


class TempolorApi(FakeApi):
    """TemPolor: ``POST music/song`` and ``music/instrumental`` answering ``jobs[]``,
    ``GET music/<job>`` (``status`` 0-9 generating, 10-29 failed, 30+ completed,
    ``status_name``, ``status_final``) and ``GET music/download/<job>`` (``url``), as
    useapi's music comparison script reads them."""

    more_create_paths = ("music/instrumental",)
    guesses = (
        "one job per create in jobs[] (a real create may start more), the fields beyond "
        "jobs[], status, status_name and status_final; no GET accounts"
    )

    def create_answer(self, call: Call, job: FakeJob) -> Any:
        return {"jobs": [job.job_id]}

    def status_job_id(self, relative: str) -> str | None:
        return _prefixed_id(relative, "music/")

    def status(self, call: Call, job: FakeJob) -> Answer:
        if job.end > call.now:
            status, name, final = 1, "GENERATING", False
        elif job.failed:
            status, name, final = 10, "FAILED", True
        else:
            status, name, final = 30, "COMPLETED", True
        return Answer(
            200,
            {
                "job_id": job.job_id,
                "status": status,
                "status_name": name,
                "status_final": final,
                "progress": 100 if final else 50,
            },
        )

    def get(self, call: Call, relative: str) -> Answer | None:
        job_id = _prefixed_id(relative, "music/download/")
        if job_id is None:
            return None
        job = self._job(call, job_id)
        if job is None or job.end > call.now or job.failed:
            return not_found(f"Job {job_id}")  # the script reads 404 as "not yet"
        return Answer(200, {"url": media_url(call, job, call.query.get("file_format", "mp3"))})


class GoogleFlowApi(FakeApi):
    """Google Flow: a sync create answers ``jobId`` (200), an async one ``jobid`` (201)
    [S-gf]; the rest of the body is not documented (GUESS: email and a status)."""

    def create_answer(self, call: Call, job: FakeJob) -> Any:
        key = "jobid" if call.asynchronous else "jobId"
        return {key: job.wire_id, "email": job.account, "status": "started"}


class FlowMusicApi(FakeApi):
    """Flow Music: a create answers the job as ``GET jobs/<jobid>`` would (documented:
    ``jobid``, ``email``, ``status`` of completed, pending or failed, ``created_at``);
    ``pending`` for an async create (201), ``completed`` for a sync one, which answers
    when the job has ended."""

    def create_answer(self, call: Call, job: FakeJob) -> Any:
        created = call.fake.wall_time(job.start).isoformat(timespec="milliseconds")
        return {
            "jobid": job.wire_id,
            "email": job.account,
            "status": "pending" if call.asynchronous else "completed",
            "created_at": created.replace("+00:00", "Z"),
        }


class LtxStudioApi(FakeApi):
    """LTX Studio (retired): ``GET assets/<jobId>`` (documented: ``status.type``,
    ``status.progress``, ``status.artifact.assetUrl``, ``jobId``). Its create path is not
    known here: the fake keeps the generic ``jobs`` (a guess)."""

    guesses = "the create path (jobs) and answer; 'failed' as the failed status.type"

    def status_job_id(self, relative: str) -> str | None:
        return _prefixed_id(relative, "assets/")

    def status(self, call: Call, job: FakeJob) -> Answer:
        if job.end > call.now:
            status: dict[str, Any] = {"type": "active", "progress": 50}
        elif job.failed:
            status = {"type": "failed", "progress": 100}
        else:
            status = {
                "type": "completed",
                "progress": 100,
                "artifact": {"assetUrl": media_url(call, job)},
            }
        body: dict[str, Any] = {"status": status, "jobId": job.job_id}
        if job.reply_url is not None:
            body["replyUrl"] = job.reply_url
        return Answer(200, body)
