"""The service table: URLs, field names, and accounts embedded in job ids."""

from __future__ import annotations

import dataclasses

import pytest

from capgate import SERVICES, Service
from capgate._services import get_service


def test_every_documented_service():
    """The six scheduler/available services and the six newer shapes are known."""
    assert set(SERVICES) == {
        *("ltxstudio", "kling", "tempolor", "riffusion", "minimax", "pixverse"),
        *("dreamina", "mureka", "minimax-agent", "luma", "flowmusic", "google-flow"),
    }


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("ltxstudio", "https://api.useapi.net/v1/ltxstudio/scheduler/available"),
        ("kling", "https://api.useapi.net/v1/kling/scheduler/available"),
        ("tempolor", "https://api.useapi.net/v1/tempolor/scheduler/available"),
        ("riffusion", "https://api.useapi.net/v1/riffusion/scheduler/available"),
        ("minimax", "https://api.useapi.net/v1/minimax/scheduler/available"),
        ("pixverse", "https://api.useapi.net/v2/pixverse/scheduler/available"),
        ("dreamina", "https://api.useapi.net/v1/dreamina/scheduler"),
        ("mureka", "https://api.useapi.net/v1/mureka/jobs"),
        ("minimax-agent", "https://api.useapi.net/v1/minimax/agent/jobs"),
        ("luma", "https://api.useapi.net/v1/luma/jobs"),
        ("flowmusic", "https://api.useapi.net/v1/flowmusic"),
        ("google-flow", "https://api.useapi.net/v1/google-flow"),
    ],
)
def test_default_urls(name, url):
    """Each service's main capacity URL is the documented one (its API root if none)."""
    assert get_service(name).url == url


@pytest.mark.parametrize(
    ("name", "account_key", "job_key", "executing_account_key"),
    [
        ("ltxstudio", "email", "jobId", "email"),
        ("kling", "email", "id", "email"),
        ("tempolor", "user_id", "job_id", None),
        ("riffusion", "user_id", "job_id", "user_id"),
        ("minimax", "account", "videoId", None),
        ("pixverse", "email", "id", None),
    ],
)
def test_field_names(name, account_key, job_key, executing_account_key):
    """Each service names its account and job id keys as documented."""
    spec = get_service(name)
    assert spec.account_key == account_key
    assert spec.job_id_keys[0] == job_key
    assert spec.executing_account_key == executing_account_key


def test_unknown_service_lists_known_ones():
    """An unknown service is a ValueError naming every known one."""
    with pytest.raises(
        ValueError,
        match=r"^unknown service 'runway'; known services: dreamina, flowmusic, google-flow, "
        r"kling, ltxstudio, luma, minimax, minimax-agent, mureka, pixverse, riffusion, tempolor$",
    ):
        get_service("runway")


def test_service_name_must_be_str():
    """A non-string service is a TypeError."""
    with pytest.raises(TypeError, match=r"^service must be a str, not int$"):
        get_service(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "job_id", "account"),
    [
        ("tempolor", "user:4242-tempolor:u123-job:99", "u123"),
        ("tempolor", "user:4242-tempolor:user-with-dashes-job:99", "user-with-dashes"),
        ("minimax", "user:1-minimax:acct-video:12", "acct"),
        ("minimax", "user:1-minimax:my-acct-video:12", "my-acct"),
        ("pixverse", "user:1-pixverse:a-b@x.io-video:7", "a-b@x.io"),
        ("pixverse", "user:1-pixverse:a@x.io", "a@x.io"),
        ("pixverse", "user:1-pixverse:a-b@x.io", "a-b@x.io"),
    ],
)
def test_account_embedded_in_job_id(name, job_id, account):
    """The account is read from the job id up to the next ``-<word>:``, dashes allowed."""
    assert get_service(name).account_from_job_id(job_id) == account


@pytest.mark.parametrize(
    ("name", "job_id"),
    [
        ("minimax", "no-marker-here"),
        ("minimax", "user:1-minimax:"),
        ("ltxstudio", "email:a@x.io:123-type:video"),
    ],
)
def test_no_embedded_account(name, job_id):
    """No marker (or nothing after it, or a service without one) gives ``None``."""
    assert get_service(name).account_from_job_id(job_id) is None


def test_service_is_public_and_frozen():
    """Service is a frozen dataclass exported as capgate.Service."""
    spec = get_service("kling")
    assert isinstance(spec, Service)
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"^cannot assign to field 'name'$"):
        spec.name = "other"  # type: ignore[misc]


# the create answers useapi's own example scripts read (shared/reference/useapi-scheduler.md,
# "What useapi's own example scripts send and read"), in the documented shapes
DOCUMENTED_CREATE_ANSWERS = [
    ("kling", {"task": {"id": 250411, "status": 5}, "works": []}, "250411"),
    ("pixverse", {"video_id": "user:1-pixverse:a@x.io-video:7"}, "user:1-pixverse:a@x.io-video:7"),
    ("pixverse", {"image_id": "user:1-pixverse:a@x.io-image:8"}, "user:1-pixverse:a@x.io-image:8"),
    (
        "tempolor",
        {"jobs": ["user:1-tempolor:u1-job:9", "user:1-tempolor:u1-job:10"]},
        "user:1-tempolor:u1-job:9",
    ),
    ("minimax", {"videoId": "user:1-minimax:acct-video:12"}, "user:1-minimax:acct-video:12"),
    ("ltxstudio", {"jobId": "email:a@x.io:7a34-type:video"}, "email:a@x.io:7a34-type:video"),
    ("dreamina", {"jobid": "j1v-u12345-US:a@x.io:dreamina"}, "j1v-u12345-US:a@x.io:dreamina"),
    ("mureka", {"jobid": "j1m-u777-a123-bot:mureka"}, "j1m-u777-a123-bot:mureka"),
    ("google-flow", {"jobId": "j1v-u1-email:a@x.io-bot:google-flow"}, None),
]


@pytest.mark.parametrize(("name", "body", "job_id"), DOCUMENTED_CREATE_ANSWERS)
def test_job_id_from_documented_create_answers(name, body, job_id):
    """Each service's job id is read where its create answer holds it: Kling's nested
    task.id, PixVerse's video_id then image_id, TemPolor's first jobs[], MiniMax's videoId."""
    expected = job_id if job_id is not None else next(iter(body.values()))
    assert get_service(name).job_id_from(body) == expected


def test_pixverse_prefers_video_id_to_image_id():
    """PixVerse's video_id comes before image_id, as useapi's script reads them."""
    body = {"image_id": "img", "video_id": "vid"}
    assert get_service("pixverse").job_id_from(body) == "vid"


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("kling", {"task": {}}),
        ("kling", {"task": "1001"}),
        ("kling", {"task": {"id": True}}),
        ("tempolor", {"jobs": []}),
        ("tempolor", {"jobs": "user:1-tempolor:u1-job:9"}),
        ("pixverse", {"video_id": "  "}),
        ("minimax", []),
        ("minimax", None),
    ],
)
def test_job_id_from_answers_without_an_id(name, body):
    """An answer with no usable id (empty, blank, a bool, the wrong type) gives None."""
    assert get_service(name).job_id_from(body) is None


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("kling", "videos/text2video"),
        ("minimax", "videos/create"),
        ("pixverse", "videos/create"),
        ("tempolor", "music/song"),
    ],
)
def test_create_paths_are_the_documented_ones(name, path):
    """The create path is the one useapi's scripts POST to (pixverse under v2)."""
    spec = get_service(name)
    assert spec.create_path == path
    assert f"{spec.api_root}/{spec.create_path}".startswith(
        f"https://api.useapi.net/{spec.version}/"
    )
