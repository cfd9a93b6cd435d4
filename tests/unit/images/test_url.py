"""The fetch deadline around name resolution: a slow resolver must not stretch IMAGE_FETCH_TIMEOUT.

Fetches go to a real HTTP server on loopback (tests/hostile_http.py); slow DNS comes through the
fetcher's `resolve_host` seam.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

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
    """Before: a resolver answering in 4 s with IMAGE_FETCH_TIMEOUT=1 took the whole 4 s."""
    fetching = resolver(image_fetch_timeout=1.0)
    calls, fetching.fetcher.resolve_host = slow_lookup(4.0, answer)
    started = time.monotonic()
    error = refused(fetching.fetch_url, "http://images.example.com/a.png")
    elapsed = time.monotonic() - started
    assert calls, "the seam was not used"
    assert error.reason == "timeout" and error.retryable
    assert "resolving image host 'images.example.com'" in error.message and "IMAGE_FETCH_TIMEOUT=1" in error.message
    assert elapsed < 3.0  # not the resolver's 4 s


def test_the_lookup_shares_the_deadline_with_the_rest_of_the_fetch(server):
    """A lookup that takes most of the budget leaves the rest for the request; a slow body after it
    still ends at IMAGE_FETCH_TIMEOUT, not lookup time + timeout."""
    fetching = resolver(image_fetch_timeout=1.5, image_allowed_hosts="images.test")
    _, fetching.fetcher.resolve_host = slow_lookup(0.5, ["127.0.0.1"])
    assert fetching.fetch_url(f"http://images.test:{server.port}/img/good") == GOOD_BODY
    assert server.requests[-1] == ("/img/good", f"images.test:{server.port}")
    started = time.monotonic()
    assert refused(fetching.fetch_url, f"http://images.test:{server.port}/trickle").reason == "timeout"
    assert time.monotonic() - started < 2.5


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
