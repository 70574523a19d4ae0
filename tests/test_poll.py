"""One poll over httpx: URL checks, Retry-After, and every failure mapped at one boundary."""

from __future__ import annotations

import base64
import json
import re

import anyio
import httpx
import pytest

from capgate import AuthenticationError, PollError
from capgate._poll import MAX_BODY_BYTES, check_url, fetch_snapshot, parse_retry_after
from capgate._services import get_service
from capgate.testing import FakeScheduler

LTX = get_service("ltxstudio")
URL = httpx.URL(LTX.url)
TOKEN = "sekrit-token-123"
GOOD = {"available": [{"email": "a@x.io", "maxJobs": 2, "executing": 0, "available": 2}]}


# --- check_url ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://api.useapi.net/v1/kling/scheduler/available",
        "http://127.0.0.1:8000/x",
        "http://localhost/x",
        "http://[::1]:9/x",
        "http://api.localhost/x",
    ],
)
def test_check_url_accepts_https_and_loopback_http(url):
    """https anywhere and plain http on a loopback host are accepted."""
    assert str(check_url(url)) == url


def test_check_url_refuses_plain_http_elsewhere():
    """Plain http to a non-loopback host is refused: the token would travel in clear."""
    with pytest.raises(ValueError, match=r"^url uses plain http:// to example\.com; "):
        check_url("http://example.com/x")


@pytest.mark.parametrize("url", ["ftp://x.io/a", "/relative/path", "https://"])
def test_check_url_refuses_non_http(url):
    """Anything but an absolute http(s) URL is refused."""
    with pytest.raises(ValueError, match=r"^url must be an absolute http:// or https:// URL$"):
        check_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/x", "https://x.io:0/a"])
def test_check_url_refuses_a_port_out_of_range(url):
    """httpx parses port 99999; the first poll then failed with an ExceptionGroup."""
    with pytest.raises(ValueError, match=r"^url's port must be from 1 to 65535, not "):
        check_url(url)


def test_check_url_refuses_credentials():
    """Credentials in the URL are refused; the token goes in the header."""
    with pytest.raises(ValueError, match=r"^url must not carry credentials; pass the token"):
        check_url("https://user:pw@x.io/a")


def test_check_url_type():
    """A URL that is not a string is a TypeError."""
    with pytest.raises(TypeError, match=r"^url must be a str, not int$"):
        check_url(3)  # type: ignore[arg-type]


# --- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 2.5 ", 2.5),
        ("-4", 0.0),
        ("Thu, 01 Jan 2026 00:00:10 GMT", 10.0),
        ("Wed, 31 Dec 2025 23:59:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value, seconds):
    """Retry-After is read as delta-seconds or an HTTP date; past is 0; junk is None."""
    assert parse_retry_after(value, now_epoch=1767225600.0) == seconds  # 2026-01-01T00:00Z


# --- fetch_snapshot --------------------------------------------------------------------------

pytestmark_async = pytest.mark.anyio


async def fetch(handler, *, timeout=5.0, url=URL, service=LTX):
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await fetch_snapshot(client, url, TOKEN, service, timeout=timeout)


def answer(status=200, body=GOOD, **kwargs):
    def handler(request):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, **kwargs)

    return handler


@pytestmark_async
async def test_fetch_sends_bearer_token_and_parses():
    """The token travels as a Bearer header and the answer is parsed."""
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json=GOOD)

    snapshot, skipped = await fetch(handler)
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert seen[0].headers["user-agent"].startswith("capgate/")
    assert snapshot.free("a@x.io") == 2
    assert skipped == []
    assert snapshot.requested_at <= snapshot.received_at


@pytestmark_async
@pytest.mark.parametrize("status", [401, 403])
async def test_fetch_401_403_is_authentication_error(status):
    """401 and 403 are AuthenticationError carrying the status code."""
    with pytest.raises(
        AuthenticationError,
        match=rf"^ltxstudio: the API token was refused \(HTTP {status}: Unauthorized\)$",
    ) as info:
        await fetch(answer(status, {"error": "Unauthorized", "code": status}))
    assert info.value.status_code == status


@pytestmark_async
async def test_fetch_error_code_401_in_a_200_body():
    """A 200 body saying ``code: 401`` is an AuthenticationError too."""
    with pytest.raises(AuthenticationError, match=r"^ltxstudio: the API token was refused"):
        await fetch(answer(200, {"error": "Unauthorized", "code": 401}))


@pytestmark_async
async def test_fetch_error_in_a_200_body_is_poll_error():
    """A 200 body with only an ``error`` is a failed poll."""
    with pytest.raises(PollError, match=r"^ltxstudio: error in the answer: boom$"):
        await fetch(answer(200, {"error": "boom"}))


@pytestmark_async
@pytest.mark.parametrize("status", [429, 500, 502, 503, 400])
async def test_fetch_http_error_is_poll_error(status):
    """Any other non-200 is a PollError with the status and the server's error text."""
    with pytest.raises(PollError, match=rf"^ltxstudio: HTTP {status}: busy$") as info:
        await fetch(answer(status, {"error": "busy"}))
    assert info.value.status_code == status
    assert info.value.retry_after is None


@pytestmark_async
async def test_fetch_reads_retry_after():
    """A Retry-After header is carried on the PollError."""
    with pytest.raises(PollError, match=r"^ltxstudio: HTTP 429: ") as info:
        await fetch(answer(429, {"error": "slow down"}, headers={"Retry-After": "7"}))
    assert info.value.retry_after == 7.0


@pytestmark_async
async def test_fetch_non_json_is_poll_error():
    """A 200 that is not JSON is a PollError."""
    with pytest.raises(PollError, match=r"^ltxstudio: answer is not JSON \(JSONDecodeError\)$"):
        await fetch(answer(200, b"<html>oops</html>"))


@pytestmark_async
async def test_fetch_non_json_error_page_is_excerpted():
    """A non-JSON error page is quoted, whitespace collapsed."""
    with pytest.raises(PollError, match=r"^ltxstudio: HTTP 502: <html> Bad gateway </html>$"):
        await fetch(answer(502, b"<html>\n  Bad gateway\n</html>"))


@pytestmark_async
async def test_fetch_empty_200_is_poll_error():
    """An empty 200 body is a wrong shape."""
    with pytest.raises(PollError, match=r"^ltxstudio: answer is a JSON NoneType, not an object$"):
        await fetch(answer(200, b""))


@pytestmark_async
async def test_fetch_refuses_body_over_limit_by_length():
    """An answer declaring more than 1 MiB is refused before reading it."""
    big = b"x" * (MAX_BODY_BYTES + 1)
    with pytest.raises(PollError, match=r"^ltxstudio: answer of 1048577 bytes is over the"):
        await fetch(answer(200, big))


@pytestmark_async
async def test_fetch_refuses_streamed_body_over_limit():
    """An answer streamed without a length is cut off past 1 MiB."""

    async def chunks():
        for _ in range(20):
            yield b"x" * 65536

    def handler(request):
        return httpx.Response(200, content=chunks())

    with pytest.raises(PollError, match=r"^ltxstudio: answer is over the 1048576 byte limit$"):
        await fetch(handler)


@pytestmark_async
async def test_fetch_follows_same_origin_redirect_with_token():
    """A redirect within the origin is followed, still with the token."""
    seen = []

    def handler(request):
        seen.append((request.url.path, request.headers.get("authorization")))
        if request.url.path.endswith("/available"):
            return httpx.Response(307, headers={"Location": "/v1/moved"})
        return httpx.Response(200, json=GOOD)

    snapshot, _ = await fetch(handler)
    assert seen[1] == ("/v1/moved", f"Bearer {TOKEN}")
    assert snapshot.free("a@x.io") == 2


@pytestmark_async
async def test_fetch_never_sends_token_to_another_origin():
    """A redirect to another host is refused; the token never goes there."""
    hosts = []

    def handler(request):
        hosts.append(request.url.host)
        return httpx.Response(302, headers={"Location": "https://evil.example/steal"})

    with pytest.raises(
        PollError, match=r"^ltxstudio: refused a redirect to another origin \(https://evil"
    ):
        await fetch(handler)
    assert hosts == ["api.useapi.net"]


@pytestmark_async
async def test_fetch_gives_up_on_redirect_loop():
    """More than five redirects is a failed poll."""

    def handler(request):
        return httpx.Response(302, headers={"Location": "/again"})

    with pytest.raises(PollError, match=r"^ltxstudio: more than 5 redirects$"):
        await fetch(handler)


@pytestmark_async
async def test_fetch_timeout_is_poll_error():
    """An answer slower than the timeout is a PollError."""

    async def handler(request):
        await anyio.sleep(10)
        return httpx.Response(200, json=GOOD)  # pragma: no cover

    with pytest.raises(PollError, match=r"^ltxstudio: no answer within 0\.05 s$"):
        await fetch(handler, timeout=0.05)


@pytestmark_async
async def test_fetch_connection_error_is_chained_poll_error():
    """A connection error is a PollError chained from the httpx error."""

    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(PollError, match=r"^ltxstudio: ConnectError: connection refused$") as info:
        await fetch(handler)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytestmark_async
async def test_fetch_httpx_timeout_is_poll_error():
    """httpx's own timeouts are PollErrors too."""

    def handler(request):
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(PollError, match=r"^ltxstudio: timed out \(ReadTimeout\)$"):
        await fetch(handler)


@pytestmark_async
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
async def test_errors_never_carry_the_token(as_json):
    """The token is in no error message, even when the server echoes it back."""

    def handler(request):
        echo = f"bad header {request.headers['authorization']}"
        if as_json:
            return httpx.Response(500, json={"error": echo})
        return httpx.Response(500, text=echo)

    with pytest.raises(PollError, match=r"^ltxstudio: HTTP 500: bad header Bearer <token>$"):
        await fetch(handler)


@pytestmark_async
async def test_errors_never_carry_a_json_escaped_token():
    """A token with a slash, echoed JSON-escaped in an error body, is masked too."""
    token = "abc/def-123"

    def handler(request):
        return httpx.Response(500, text='{"detail": "bad abc\\/def-123"}')  # as JS escapes

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(PollError) as caught:
            await fetch_snapshot(client, URL, token, LTX, timeout=5.0)
    assert "abc\\/def" not in str(caught.value)
    assert "<token>" in str(caught.value)


@pytestmark_async
@pytest.mark.parametrize(
    "encode",
    [
        lambda header: header.replace(" ", "%20").replace(":", "%3A"),  # a WAF page's quote
        lambda header: header.replace(" ", "+").replace(":", "%3A"),
        lambda header: base64.b64encode(header.encode()).decode(),  # a proxy's debug dump
        lambda header: base64.b64encode(header[7:].encode()).decode(),
        # inside a longer dump, the token at each of base64's 3 offsets, bytes after it
        lambda header: base64.b64encode(f'{{"a": "{header}", "b": 1}}'.encode()).decode(),
        lambda header: base64.b64encode(f'{{"ab": "{header}", "b": 1}}'.encode()).decode(),
        lambda header: base64.b64encode(f'{{"abc": "{header}", "b": 1}}'.encode()).decode(),
    ],
    ids=["percent", "plus", "base64-header", "base64-token", "dump-0", "dump-1", "dump-2"],
)
async def test_errors_never_carry_an_encoded_token(encode):
    """A token with a colon, echoed percent-encoded or in base64, is masked too."""
    token = "user:4242-Zq9SeCrEt"

    def handler(request):
        return httpx.Response(503, text=f"blocked: {encode(request.headers['authorization'])}")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(PollError) as caught:
            await fetch_snapshot(client, URL, token, LTX, timeout=5.0)
    text = str(caught.value)
    assert "<token>" in text
    assert "SeCrEt" not in text
    assert b"4242-Zq9" not in _decodable(text)  # around the mask, at most 2 bytes of it


def _decodable(text: str) -> bytes:
    """Whatever base64 in ``text`` decodes to, read from each of the 4 offsets."""
    out = b""
    for run in re.findall(r"[A-Za-z0-9+/]{4,}", text):
        for offset in range(4):
            chunk = run[offset:]
            out += base64.b64decode(chunk[: len(chunk) // 4 * 4]) + b"|"
    return out


@pytestmark_async
async def test_token_echoed_in_a_cross_origin_redirect_stays_out_of_errors_and_logs(
    make_gate, logs
):
    """A redirect whose target host echoes the token: refused, and the token is not shown.

    Regression: the refusal message quoted the target's host verbatim, unlike every other
    server-controlled text, which has the token replaced.
    """
    token = "Sekrit-Token-1234"  # hosts come back lowercased

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": f"https://{token}.evil.example/x"})

    gate, _ = make_gate(
        FakeScheduler({"a@x.io": 1}), token=token, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(Exception, match=r"refused a redirect to another origin") as info:
        await gate.refresh()
    secret = token.lower()
    assert secret not in str(info.value).lower()
    assert secret not in repr(gate.statistics()).lower()
    assert all(secret not in repr(event).lower() for event in logs)
