"""Fetching one snapshot of a service's capacity over httpx.

This is the only module that sees httpx errors: each is mapped here, at one boundary, to
:class:`PollError` or :class:`AuthenticationError`, chained with ``raise … from exc``.
The token travels only in the ``Authorization`` header of requests to the configured
origin; redirects are followed by hand, and only within that origin.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

import anyio
import httpx

from ._config import GateConfig, Secret, check_url
from ._errors import AuthenticationError, CapacityGateError, PollError
from ._models import SkippedRow, Snapshot, one_row_per_account, parse_snapshot
from ._services import Service
from ._sources import ReadContext
from ._version import __version__

__all__ = [
    "MAX_BODY_BYTES",
    "Secret",
    "check_url",
    "fetch_capacity",
    "fetch_snapshot",
    "parse_retry_after",
]

T = TypeVar("T")

MAX_BODY_BYTES = 1024 * 1024
#: past MAX_BODY_BYTES an answer is read and dropped up to this size, then cut off
MAX_DRAIN_BYTES = 16 * MAX_BODY_BYTES
MAX_REDIRECTS = 5
USER_AGENT = f"capgate/{__version__}"


def _headers(secret: Secret) -> dict[str, str]:
    # built in its own frame so that no local of fetch_snapshot holds the token in clear:
    # httpx.Headers masks Authorization in its repr, a plain dict would not
    return {
        "Authorization": f"Bearer {secret.reveal()}",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }


def parse_retry_after(value: str | None, *, now_epoch: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if now_epoch is None:
            import time  # wall-clock only to read an absolute HTTP date

            now_epoch = time.time()
        seconds = when.timestamp() - now_epoch
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0
    return seconds


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _echoed_forms(secret: str) -> set[str]:
    """How a server or proxy may echo the token: as sent, in any case (URL hosts come back
    lowercased), JSON-escaped, percent-encoded (a WAF page quoting the header), and in
    base64 (a debugging proxy's dump of the headers)."""
    escaped = json.dumps(secret)[1:-1]
    forms = {
        secret,
        escaped,
        escaped.replace("/", "\\/"),
        quote(secret, safe=""),
        quote_plus(secret),
    }
    return forms | _base64_cores(secret.encode())


def _base64_cores(raw: bytes) -> set[str]:
    """The base64 text that ``raw`` alone decides wherever it sits in a longer base64 text.

    Base64 turns each 3 bytes into 4 characters, so in a dump the token starts at one of 3
    offsets; at each, the characters it shares with the bytes before or after it depend on
    those, the rest only on the token. Masking those leaves at most 2 of its bytes at each
    end to be read, and none of a token of a few bytes only (too short: not masked).
    """
    cores = set()
    for shift in range(3):
        text = base64.b64encode(b"\0" * shift + raw).decode()
        start = 4 if shift else 0  # the group it shares with what comes before
        end = len(text) - (4 if (shift + len(raw)) % 3 else 0)  # ... with what follows
        core = text[start:end]
        if len(core) >= 8:
            cores.add(core)
    return cores


def _excerpt(text: str, limit: int = 200, *, secret: str = "") -> str:
    if secret:  # a server (or proxy) echoing the Authorization header must not leak it
        for form in sorted(_echoed_forms(secret), key=len, reverse=True):
            text = re.sub(re.escape(form), "<token>", text, flags=re.IGNORECASE)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_text(data: Any, secret: str = "") -> str | None:
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, str):
            return _excerpt(error, secret=secret)
        if error is not None:
            return _excerpt(json.dumps(error, default=str), secret=secret)
    return None


async def _read_limited(response: httpx.Response, service: str) -> bytes:
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise PollError(
            f"{service}: answer of {int(length)} bytes is over the {MAX_BODY_BYTES} byte limit",
            status_code=response.status_code,
        )
    chunks: list[bytes] = []
    size = 0
    # Leaving httpx's stream iterators early abandons a chain of async generators, which
    # trio reports as a ResourceWarning. So past the limit we stop keeping the chunks but
    # drain them (bounded by the poll's timeout), and only break off a truly huge answer.
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        else:
            chunks.clear()
            if size > MAX_DRAIN_BYTES:
                break
    if size > MAX_BODY_BYTES:
        raise PollError(
            f"{service}: answer is over the {MAX_BODY_BYTES} byte limit",
            status_code=response.status_code,
        )
    return b"".join(chunks)


async def _get_json(client: httpx.AsyncClient, url: httpx.URL, secret: Secret, name: str) -> Any:
    """One GET, redirects followed within ``url``'s origin; the decoded JSON answer.

    An empty 404 is ``None`` (Luma's accounts endpoint with none configured).
    """
    target = url
    for _ in range(MAX_REDIRECTS + 1):
        request = client.build_request("GET", target, headers=_headers(secret))
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            if response.is_redirect:
                location = response.headers.get("location", "")
                next_url = target.join(location)
                if not _same_origin(next_url, url):
                    origin = f"{next_url.scheme}://{next_url.host}"
                    raise PollError(
                        f"{name}: refused a redirect to another origin "
                        f"({_excerpt(origin, secret=secret.reveal())})",
                        status_code=response.status_code,
                    )
                target = next_url
                continue
            body = await _read_limited(response, name)
        finally:
            await response.aclose()
        break
    else:
        raise PollError(f"{name}: more than {MAX_REDIRECTS} redirects")

    status = response.status_code
    data: Any = None
    decode_error: str | None = None
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as exc:
        decode_error = f"not JSON ({type(exc).__name__})"

    error = _error_text(data, secret.reveal())
    if status in (401, 403):
        raise AuthenticationError(
            f"{name}: the API token was refused (HTTP {status}" + (f": {error})" if error else ")"),
            status_code=status,
        )
    if status == 404 and not body.strip():
        return None
    if status != 200:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        detail = error or (
            _excerpt(body.decode("utf-8", "replace"), secret=secret.reveal())
            if body
            else "empty body"
        )
        raise PollError(
            f"{name}: HTTP {status}: {detail}", status_code=status, retry_after=retry_after
        )
    if decode_error is not None:
        raise PollError(f"{name}: answer is {decode_error}", status_code=status)
    # an answer that is only an error (no data beside it) failed, whatever its status says
    if isinstance(data, dict) and error is not None and set(data) <= {"error", "code"}:
        code = data.get("code")
        if code in (401, 403):
            raise AuthenticationError(
                f"{name}: the API token was refused ({error})", status_code=code
            )
        raise PollError(f"{name}: error in the answer: {error}", status_code=status)
    return data


async def _bounded(
    name: str, secret: Secret, timeout: float, work: Callable[[], Awaitable[T]]
) -> T:
    """Run ``work`` within ``timeout`` seconds, every failure mapped to the gate's errors."""
    try:
        with anyio.fail_after(timeout):
            return await work()
    except TimeoutError:
        raise PollError(f"{name}: no answer within {timeout:g} s") from None
    except httpx.TimeoutException as exc:
        raise PollError(f"{name}: timed out ({type(exc).__name__})") from exc
    except CapacityGateError:
        raise
    except Exception as exc:  # httpx's errors, or a custom transport's own: a failed poll
        raise PollError(
            f"{name}: {type(exc).__name__}: {_excerpt(str(exc), secret=secret.reveal())}"
        ) from exc


async def fetch_snapshot(
    client: httpx.AsyncClient,
    url: httpx.URL,
    token: Secret | str,
    service: Service,
    *,
    timeout: float,
) -> tuple[Snapshot, list[SkippedRow]]:
    """One GET of ``scheduler/available``, parsed.

    Args:
        client: The client to send with.
        url: The endpoint (validated by :func:`check_url`).
        token: The API token (best as a :class:`Secret`); sent only to ``url``'s origin.
        service: Field names to parse with.
        timeout: Seconds the whole exchange may take (also bounds in-memory transports).

    Returns:
        The snapshot and the malformed rows that were skipped.

    Raises:
        AuthenticationError: 401 or 403, or a body saying so.
        PollError: Anything else that is not a usable answer.
    """
    name = service.name
    requested_at = anyio.current_time()
    secret = token if isinstance(token, Secret) else Secret(token)
    del token  # from here on only the Secret, whose repr hides it
    data = await _bounded(name, secret, timeout, lambda: _get_json(client, url, secret, name))
    if isinstance(data, dict) and "error" in data and "available" not in data:
        error = _error_text(data, secret.reveal())
        if error is not None:
            raise PollError(f"{name}: error in the answer: {error}", status_code=200)
    return parse_snapshot(
        data, service, requested_at=requested_at, received_at=anyio.current_time()
    )


async def fetch_capacity(
    client: httpx.AsyncClient,
    config: GateConfig,
    *,
    timeout: float,
    clock: Callable[[], float] = anyio.current_time,
) -> tuple[Snapshot, list[SkippedRow]]:
    """One poll of a gate's capacity source: every endpoint due, read and parsed.

    The source (``config.service.source``) decides which endpoints to read; this function
    sends them (only to the configured origins, the token in a header) and maps every
    failure, as :func:`fetch_snapshot` does. ``timeout`` bounds the whole poll; ``clock``
    times it (the gate's, on which the snapshot's instants are read).

    Raises:
        AuthenticationError: 401 or 403 on any endpoint, or a body saying so.
        PollError: Anything else that is not a usable answer.
    """
    spec = config.service
    name = spec.name
    reading = (
        config.reading
        if config.reading is not None
        else ReadContext(spec, config.max_jobs, config.accounts)
    )
    secret = config.token
    main, root = spec.source.path, config.api_root
    requested_at = clock()

    async def get(path: str) -> Any:
        if path == main:
            data = await _get_json(client, config.url, secret, name)
            mark = spec.source.error_unless
            if mark and isinstance(data, dict) and "error" in data and mark not in data:
                error = _error_text(data, secret.reveal())
                if error is not None:
                    raise PollError(f"{name}: error in the answer: {error}", status_code=200)
            return data
        target = httpx.URL(str(root).rstrip("/") + "/" + quote(path, safe="/"))
        return await _get_json(client, target, secret, name)

    result = await _bounded(
        name, secret, timeout, lambda: spec.source.read(get, reading, requested_at)
    )
    skipped = list(result.skipped)
    accounts = one_row_per_account(enumerate(result.accounts), "accounts", skipped)
    snapshot = Snapshot(
        service=name,
        accounts=tuple(accounts),
        executing=tuple(result.executing),
        requested_at=requested_at,
        received_at=clock(),
        skipped=len(skipped),
    )
    return snapshot, skipped
