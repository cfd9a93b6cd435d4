"""Image URLs as messages show them, and the fetch deadline around name resolution.

Secrets in a URL (userinfo, pre-signed query strings, fragments) must never reach an error message,
which becomes a dead-letter header; a URL that is not valid Unicode must be refused, not crash the
fetch; and a slow resolver must not stretch IMAGE_FETCH_TIMEOUT. Fetches go to a real HTTP server on
loopback (tests/hostile_http.py); slow DNS comes through the fetcher's `resolve_host` seam.
"""

from __future__ import annotations

import socket
import string
import threading
import time
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.errors import FetchError
from consumer.images import ImageResolver
from consumer.settings import Settings
from tests.hostile_http import HostileServer

GOOD_BODY = b"\x89PNG not really, but bytes"


@pytest.fixture(scope="module")
def server():
    with HostileServer() as running:
        running.files["good"] = GOOD_BODY
        running.redirects["signed"] = "/status/404?X-Amz-Credential=REDIRSECRETcred&X-Amz-Signature=REDIRSECRETsig"
        running.redirects["userinfo"] = running.url("/status/404", host="redirect-user:REDIRSECRETpw@127.0.0.1")
        yield running


def resolver(**overrides) -> ImageResolver:
    return ImageResolver(Settings(**{"image_fetch_timeout": 2.0, "image_allowed_hosts": "127.0.0.1", **overrides}))


def refused(call, *args) -> FetchError:
    with pytest.raises(FetchError) as caught:
        call(*args)
    return caught.value


MESSAGE_BOUND = 1000  # consumer.images.shown.MAX_MESSAGE_CHARS; spelled out so these tests run on older code


def assert_shown_safely(message: str) -> None:
    message.encode("utf-8")  # raises for a lone surrogate: the header could not be produced
    assert len(message) <= MESSAGE_BOUND


def test_the_message_bound_is_the_one_the_image_layer_applies():
    from consumer.images.shown import MAX_MESSAGE_CHARS

    assert MAX_MESSAGE_CHARS == MESSAGE_BOUND


# -- URLs that are not valid Unicode ---------------------------------------------------------------


@pytest.mark.parametrize(
    "where, template",
    [
        ("path", "http://127.0.0.1:{port}/img/a\ud800.png"),
        ("query", "http://127.0.0.1:{port}/img/good?v=\udfff"),
        ("userinfo", "http://us\ud800er:pw@127.0.0.1:{port}/img/good"),
        ("fragment", "http://127.0.0.1:{port}/img/good#\udc00"),
        ("host", "http://ex\ud800ample.com/img/good"),
    ],
)
def test_a_lone_surrogate_anywhere_in_the_url_is_refused_before_anything_is_sent(server, where, template):
    """Before: quoting the path or query raised UnicodeEncodeError (the replica exited 2); in the
    userinfo or fragment the fetch went ahead and its message could not be encoded as a header."""
    before = len(server.requests)
    error = refused(resolver().fetch_url, template.format(port=server.port))
    assert error.reason == "bad_url" and "surrogate" in error.message, where
    assert_shown_safely(error.message)
    if where in ("path", "host"):  # shown, escaped; elsewhere it is redacted with its part
        assert "\\ud" in error.message
    assert len(server.requests) == before


# -- redaction -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://host/a.png", "https://host/a.png"),
        ("https://alice:hunter2@host:8443/a.png", "https://***@host:8443/a.png"),
        ("https://token@host/a.png", "https://***@host/a.png"),
        (
            "https://bucket.s3.amazonaws.com/k.png?X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=abcdef",
            "https://bucket.s3.amazonaws.com/k.png?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("https://host/a.png?sv=1&sig=", "https://host/a.png?sv=***&sig=***"),
        ("https://host/a.png?rawtokenwithoutname", "https://host/a.png?***"),
        ("https://host/a.png#access_token=xyz", "https://host/a.png"),
        ("https://u:p@[::1/a.png?sig=1", "https://***@[::1/..."),
        ("http://host/a\u202ebmp.png\x00", "http://host/a\\u202ebmp.png\\x00"),
        ("no scheme at all", "no scheme at all"),
    ],
)
def test_redact_url_drops_userinfo_query_values_and_fragment(url, shown):
    from consumer.images.url import redact_url

    assert redact_url(url) == shown


def test_redact_url_is_bounded_and_always_encodes():
    from consumer.images.url import redact_url

    shown = redact_url("http://host/" + "\ud800" * 10_000)
    assert len(shown) <= 200 and shown.endswith("…")
    shown.encode("utf-8")


SECRET_ALPHABET = string.ascii_uppercase + string.digits
secrets = st.text(SECRET_ALPHABET, min_size=6, max_size=24).map(lambda tail: "SECRET" + tail)
names = st.sampled_from(["X-Amz-Signature", "X-Amz-Credential", "sig", "token", "AWSAccessKeyId", "key"])
routes = st.sampled_from(
    [
        "/status/404",
        "/status/503",
        "/huge-header",
        "/redirect/signed",
        "/redirect/userinfo",
        "/loop",
        "/long-declared/good",
        "/endless",
    ]
)


@st.composite
def urls_with_secrets(draw) -> tuple[str, list[str]]:
    """A URL to the test server (or one refused before it) with secrets in its userinfo, query and
    fragment; and the secrets, each as written and percent-decoded."""
    port = draw(st.sampled_from(["{port}", "99999", "{port}"]))
    host = draw(st.sampled_from(["127.0.0.1", "127.0.0.1", "localhost", "169.254.169.254", "[::1"]))
    scheme = draw(st.sampled_from(["http", "http", "https", "ftp"]))
    hidden: list[str] = []
    userinfo = ""
    if draw(st.booleans()):
        user, password = draw(secrets), draw(secrets)
        password = password[:3] + draw(st.sampled_from(["", "%2F", "%40", "%3A"])) + password[3:]
        userinfo = f"{user}:{password}@" if draw(st.booleans()) else f"{user}@"
        hidden += [user, password]
    query_parts = []
    for _ in range(draw(st.integers(0, 3))):
        value = draw(secrets)
        hidden.append(value)
        query_parts.append(f"{draw(names)}={value}" if draw(st.booleans()) else value)
    fragment = ""
    if draw(st.booleans()):
        fragment = "#access_token=" + draw(secrets)
        hidden.append(fragment.partition("=")[2])
    query = "?" + "&".join(query_parts) if query_parts else ""
    url = f"{scheme}://{userinfo}{host}:{port}{draw(routes)}{query}{fragment}"
    return url, hidden + [unquote(secret) for secret in hidden] + ["REDIRSECRET"]


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=urls_with_secrets())
def test_no_secret_of_the_url_ever_appears_in_a_fetch_error(server, case):
    template, hidden = case
    url = template.replace("{port}", str(server.port))
    try:
        resolver(image_max_bytes=100_000).fetch_url(url)
    except FetchError as error:
        assert_shown_safely(error.message)
        for secret in hidden:
            assert secret not in error.message, (secret, error.message)
            assert quote(secret, safe="") not in error.message, (secret, error.message)
    else:
        pytest.fail(f"{url} was fetched; every route used here fails")


def test_a_url_in_a_redirect_is_redacted_too(server):
    url = server.url("/redirect/signed?X-Amz-Signature=FIRSTSECRET")
    error = refused(resolver().fetch_url, url)
    assert error.reason == "http_404" and "redirect" in error.message
    assert "X-Amz-Signature=***" in error.message and "X-Amz-Credential=***" in error.message
    assert "SECRET" not in error.message


# -- name resolution inside the deadline ------------------------------------------------------------


def slow_lookup(seconds: float, answer: list[str] | BaseException) -> tuple[list[float], object]:
    """A `resolve_host` that answers after `seconds`; the list records when each call was made."""
    calls: list[float] = []

    def resolve_host(host: str, port: int) -> list[str]:
        calls.append(time.monotonic())
        time.sleep(seconds)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return calls, resolve_host


@pytest.mark.parametrize(
    "answer", [["93.184.216.34"], socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")]
)
def test_a_slow_name_lookup_is_cut_off_by_the_fetch_deadline(answer):
    """Before: a resolver answering in 4 s with IMAGE_FETCH_TIMEOUT=1 took the whole 4 s (here it would
    take 60 s)."""
    fetching = resolver(image_fetch_timeout=1.0)
    calls, fetching.fetcher.resolve_host = slow_lookup(60.0, answer)
    started = time.monotonic()
    error = refused(fetching.fetch_url, "http://images.example.com/a.png")
    elapsed = time.monotonic() - started
    assert calls, "the seam was not used"
    assert error.reason == "timeout" and error.retryable
    assert "resolving image host 'images.example.com'" in error.message and "IMAGE_FETCH_TIMEOUT=1" in error.message
    assert elapsed < 20.0  # a guard: the resolver alone takes 60 s


def test_the_lookup_shares_the_deadline_with_the_rest_of_the_fetch(server):
    """A lookup that takes most of the budget leaves the rest for the request; a slow body after it
    still ends at IMAGE_FETCH_TIMEOUT, not lookup time + timeout."""
    fetching = resolver(image_fetch_timeout=1.5, image_allowed_hosts="images.test")
    _, fetching.fetcher.resolve_host = slow_lookup(0.5, ["127.0.0.1"])
    assert fetching.fetch_url(f"http://images.test:{server.port}/img/good") == GOOD_BODY
    assert server.requests[-1] == ("/img/good", f"images.test:{server.port}")
    started = time.monotonic()
    assert refused(fetching.fetch_url, f"http://images.test:{server.port}/trickle").reason == "timeout"
    assert time.monotonic() - started < 10  # a guard: the trickle alone goes on for good


def test_an_abandoned_lookup_does_not_hold_up_the_caller():
    fetching = resolver(image_fetch_timeout=0.3)
    release = threading.Event()

    def stuck(host: str, port: int) -> list[str]:
        release.wait(30)
        return ["93.184.216.34"]

    fetching.fetcher.resolve_host = stuck
    try:
        assert refused(fetching.fetch_url, "http://stuck.example/a.png").reason == "timeout"
    finally:
        release.set()
