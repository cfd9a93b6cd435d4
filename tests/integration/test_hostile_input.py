"""Hostile input through the real service: one case per threat, each ending in exactly one dead letter.

One `python -m consumer run` subprocess on the real broker takes every case below, then a set of good
but awkward images (palette, CMYK, 16-bit, EXIF-rotated, animated, line-wrapped base64, redirect)
that must still be described. URL cases go to a misbehaving HTTP server on loopback
(tests/hostile_http.py); only "127.0.0.1" is in IMAGE_ALLOWED_HOSTS. URLs carrying secrets (userinfo,
pre-signed query strings) must leave no trace of them in any dead-letter header or log line.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from devtools.samples import png_bytes, sample_diagram
from tests.hostile_http import HostileServer
from tests.support import committed_equals_end, http_get, produce, read_records

pytestmark = pytest.mark.integration

IMAGE_MAX_BYTES = 100_000
MAX_EVENT_BYTES = 200_000
PRODUCER_MAX_BYTES = 170_000  # below MAX_EVENT_BYTES on purpose: a dead letter that cannot carry its value
OUTPUT_TOPIC_MAX_BYTES = 4_000  # the broker refuses larger results


@dataclass(frozen=True)
class Case:
    name: str
    value: bytes | None
    stage: str
    reason: str
    value_omitted: bool = False


def event(name: str, image: dict, **fields) -> bytes:
    return json.dumps({"id": name, "image": image, **fields}).encode()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def repeat_last_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG whose last scan is repeated `times` more times (see tests/unit/images/test_decode.py)."""
    last_scan = jpeg[jpeg.rfind(b"\xff\xda") : -2]
    return jpeg[:-2] + last_scan * times + b"\xff\xd9"


SECRET = "SECRET"  # every secret below contains it; no header or log line may


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def hostile_cases(server: HostileServer, good_png: bytes) -> list[Case]:
    port = server.port
    url = server.url
    truncated = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    scan_bomb = repeat_last_scan(encode(Image.new("RGB", (2000, 2000), "white"), "JPEG", progressive=True), 5000)
    cases = [
        # -- parse: the record itself
        Case("not-json", b"{not json", "parse", "not_json"),
        Case("deeply-nested-json", b"[" * 100_000, "parse", "not_json"),
        Case("huge-integer", b'{"id": ' + b"9" * 5000 + b"}", "parse", "not_json"),
        Case("tombstone", None, "parse", "empty"),
        Case("not-an-object", b'["a", "list"]', "parse", "not_object"),
        Case("id-wrong-type", json.dumps({"id": 17, "image": {"path": "a.png"}}).encode(), "parse", "invalid_field"),
        Case("no-reference", event("no-reference", {}), "parse", "invalid_field"),
        Case("two-references", event("two-references", {"path": "a.png", "base64": "AAAA"}), "parse", "invalid_field"),
        Case("unknown-reference-kind", event("unknown-reference-kind", {"s3": "s3://b/k"}), "parse", "invalid_field"),
        Case(
            "metadata-unpublishable",
            b'{"id": "metadata-unpublishable", "image": {"base64": "AAAA"}, "metadata": {"note": "\\udc00"}}',
            "parse",
            "invalid_unicode",
        ),
        Case(
            "prompt-too-long", event("prompt-too-long", {"base64": "AAAA"}, prompt="p" * 9000), "parse", "invalid_field"
        ),
        Case(
            "event-over-max-event-bytes",
            event("event-over-max-event-bytes", {"base64": "A" * 300_000}),
            "parse",
            "too_large",
            value_omitted=True,
        ),
        # -- fetch: SSRF in every spelling, and redirects
        Case(
            "ssrf-cloud-metadata",
            event("ssrf-cloud-metadata", {"url": "http://169.254.169.254/latest/meta-data/"}),
            "fetch",
            "forbidden_address",
        ),
        Case(
            "ssrf-loopback-name",
            event("ssrf-loopback-name", {"url": url("/img/good", host="localhost")}),
            "fetch",
            "forbidden_address",
        ),
        Case(
            "ssrf-decimal-ipv4",
            event("ssrf-decimal-ipv4", {"url": f"http://2130706433:{port}/img/good"}),
            "fetch",
            "forbidden_address",
        ),
        Case(
            "ssrf-octal-ipv4",
            event("ssrf-octal-ipv4", {"url": f"http://0177.0.0.1:{port}/img/good"}),
            "fetch",
            "forbidden_address",
        ),
        Case(
            "ssrf-ipv6-loopback",
            event("ssrf-ipv6-loopback", {"url": f"http://[::1]:{port}/img/good"}),
            "fetch",
            "forbidden_address",
        ),
        Case(
            "ssrf-ipv4-mapped-ipv6",
            event("ssrf-ipv4-mapped-ipv6", {"url": f"http://[::ffff:127.0.0.1]:{port}/"}),
            "fetch",
            "forbidden_address",
        ),
        Case(
            "ssrf-unspecified",
            event("ssrf-unspecified", {"url": f"http://0.0.0.0:{port}/img/good"}),
            "fetch",
            "forbidden_address",
        ),
        Case("ssrf-cgnat", event("ssrf-cgnat", {"url": "http://100.64.0.1/"}), "fetch", "forbidden_address"),
        Case(
            "ssrf-private-10", event("ssrf-private-10", {"url": "https://10.0.0.1/a.png"}), "fetch", "forbidden_address"
        ),
        Case(
            "redirect-to-metadata",
            event("redirect-to-metadata", {"url": url("/redirect/metadata")}),
            "fetch",
            "forbidden_address",
        ),
        Case(
            "redirect-to-loopback-name",
            event("redirect-to-loopback-name", {"url": url("/redirect/localhost")}),
            "fetch",
            "forbidden_address",
        ),
        Case("redirect-loop", event("redirect-loop", {"url": url("/loop")}), "fetch", "too_many_redirects"),
        Case("scheme-file", event("scheme-file", {"url": "file:///etc/passwd"}), "fetch", "bad_scheme"),
        Case(
            "scheme-data",
            event("scheme-data", {"url": "data:image/png;base64," + b64(good_png)}),
            "fetch",
            "bad_scheme",
        ),
        Case(
            "url-header-injection",
            event("url-header-injection", {"url": url("/img/good") + "\r\nX-Evil: 1"}),
            "fetch",
            "bad_url",
        ),
        # -- URLs that are not valid Unicode (a lone surrogate is valid JSON): refused when the event is
        # parsed (any string of the event); the image layer refuses them too (tests/unit/images/test_url.py)
        Case(
            "url-surrogate-path",
            event("url-surrogate-path", {"url": url("/img/a\ud800.png")}),
            "parse",
            "invalid_unicode",
        ),
        Case(
            "url-surrogate-query",
            event("url-surrogate-query", {"url": url("/img/good?v=\udfff")}),
            "parse",
            "invalid_unicode",
        ),
        Case(
            "url-surrogate-userinfo",
            event("url-surrogate-userinfo", {"url": url("/img/good", host="us\ud800er:pw@127.0.0.1")}),
            "parse",
            "invalid_unicode",
        ),
        Case(
            "url-surrogate-fragment",
            event("url-surrogate-fragment", {"url": url("/img/good#\udc00")}),
            "parse",
            "invalid_unicode",
        ),
        # -- fetch: secrets in the URL, which no header or log may repeat
        Case(
            "secret-userinfo",
            event("secret-userinfo", {"url": url("/status/404", host=f"alice:{SECRET}-pw@127.0.0.1")}),
            "fetch",
            "http_404",
        ),
        Case(
            "secret-presigned-query",
            event(
                "secret-presigned-query",
                {"url": url(f"/status/404?X-Amz-Credential={SECRET}-cred&X-Amz-Signature={SECRET}-sig")},
            ),
            "fetch",
            "http_404",
        ),
        Case(
            "secret-redirect-to-presigned",
            event("secret-redirect-to-presigned", {"url": url(f"/redirect/presigned?token={SECRET}-first")}),
            "fetch",
            "http_404",
        ),
        Case(
            "secret-forbidden-address",
            event(
                "secret-forbidden-address",
                {"url": f"http://bob:{SECRET}-pw@169.254.169.254/latest/?sig={SECRET}-sig#{SECRET}-fragment"},
            ),
            "fetch",
            "forbidden_address",
        ),
        # -- fetch: servers that misbehave
        Case("server-trickles-bytes", event("server-trickles-bytes", {"url": url("/trickle")}), "fetch", "timeout"),
        Case("server-endless-body", event("server-endless-body", {"url": url("/endless")}), "fetch", "too_large"),
        Case(
            "server-declares-huge", event("server-declares-huge", {"url": url("/declared-huge")}), "fetch", "too_large"
        ),
        Case(
            "server-huge-headers", event("server-huge-headers", {"url": url("/huge-header")}), "fetch", "bad_response"
        ),
        Case("server-404", event("server-404", {"url": url("/status/404")}), "fetch", "http_404"),
        # -- fetch: paths
        Case("path-traversal", event("path-traversal", {"path": "../outside.png"}), "fetch", "outside_root"),
        Case(
            "path-absolute-elsewhere",
            event("path-absolute-elsewhere", {"path": "/etc/passwd"}),
            "fetch",
            "outside_root",
        ),
        Case("path-symlink-out", event("path-symlink-out", {"path": "link-out.png"}), "fetch", "outside_root"),
        Case("path-directory", event("path-directory", {"path": "subdir"}), "fetch", "not_a_file"),
        Case("path-nul-byte", event("path-nul-byte", {"path": "good.png\u0000.txt"}), "fetch", "bad_path"),
        # -- fetch: inline base64
        Case("base64-invalid", event("base64-invalid", {"base64": "not*base64*at*all"}), "fetch", "invalid_base64"),
        Case(
            "base64-over-image-max-bytes",
            event("base64-over-image-max-bytes", {"base64": b64(os.urandom(110_000))}),
            "fetch",
            "too_large",
        ),
        Case(
            "dead-letter-over-producer-limit",
            event("dead-letter-over-producer-limit", {"base64": b64(os.urandom(135_000))}),
            "fetch",
            "too_large",
            value_omitted=True,
        ),
        # -- decode
        Case("not-an-image", event("not-an-image", {"base64": b64(b"hello, not a picture")}), "decode", "not_an_image"),
        Case(
            "svg", event("svg", {"base64": b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>')}), "decode", "not_raster"
        ),
        Case("pdf", event("pdf", {"base64": b64(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n")}), "decode", "not_raster"),
        Case(
            "png-bomb",
            event("png-bomb", {"base64": b64(png_header_only(100_000, 100_000))}),
            "decode",
            "too_many_pixels",
        ),
        Case(
            "over-pixel-limit",
            event("over-pixel-limit", {"base64": b64(png_header_only(3000, 2000))}),
            "decode",
            "too_many_pixels",
        ),
        Case(
            "jpeg-repeated-scans",
            event("jpeg-repeated-scans", {"base64": b64(scan_bomb)}),
            "decode",
            "too_many_scans",
        ),
        Case(
            "truncated-png",
            event("truncated-png", {"base64": b64(truncated[: len(truncated) // 2])}),
            "decode",
            "corrupt",
        ),
        Case("gzip-bomb-over-http", event("gzip-bomb-over-http", {"url": url("/gzip-bomb")}), "decode", "not_an_image"),
        Case(
            "content-length-lies-low",
            event("content-length-lies-low", {"url": url("/short-declared/good")}),
            "decode",
            "corrupt",
        ),
        # -- publish: the result is larger than the output topic accepts
        Case(
            "result-over-broker-limit",
            event("result-over-broker-limit", {"base64": b64(good_png)}, metadata={"blob": b64(os.urandom(6000))}),
            "publish",
            "too_large",
        ),
    ]
    assert len({case.name for case in cases}) == len(cases)
    return cases


def good_events(server: HostileServer, good_png: bytes) -> dict[str, tuple[bytes, list[int]]]:
    """Awkward but legitimate images: name -> (event, expected image_size)."""
    palette = Image.new("P", (300, 200))
    palette.putpalette([0, 0, 0, 200, 30, 30] * 128)
    palette.paste(1, (50, 50, 250, 150))
    grey16 = Image.linear_gradient("L").resize((256, 256)).convert("I").point(lambda v: v * 256).convert("I;16")
    rotated = sample_diagram(1, (600, 400))
    exif = rotated.getexif()
    exif[0x0112] = 6
    frames = [sample_diagram(i, (600, 400)) for i in range(3)]
    text = b64(good_png)
    wrapped = "data:image/png;base64," + "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    return {
        "good-url": (event("good-url", {"url": server.url("/img/good")}), [320, 240]),
        "good-redirect": (event("good-redirect", {"url": server.url("/redirect/good")}), [320, 240]),
        "good-path": (event("good-path", {"path": "good.png"}), [320, 240]),
        "good-base64-wrapped": (event("good-base64-wrapped", {"base64": wrapped}), [320, 240]),
        "good-palette-transparent": (
            event("good-palette-transparent", {"base64": b64(encode(palette, "PNG", transparency=0))}),
            [300, 200],
        ),
        "good-cmyk-jpeg": (
            event("good-cmyk-jpeg", {"base64": b64(encode(sample_diagram(2, (640, 320)).convert("CMYK"), "JPEG"))}),
            [640, 320],
        ),
        "good-16-bit-png": (event("good-16-bit-png", {"base64": b64(encode(grey16, "PNG"))}), [256, 256]),
        "good-exif-rotated": (
            event("good-exif-rotated", {"base64": b64(encode(rotated, "JPEG", exif=exif))}),
            [400, 600],
        ),
        "good-animated-gif": (
            event(
                "good-animated-gif", {"base64": b64(encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))}
            ),
            [600, 400],
        ),
    }


def limit_topic_message_size(bootstrap: str, topic: str, max_bytes: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", str(max_bytes), incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def test_every_hostile_event_ends_as_one_dead_letter_and_good_ones_still_succeed(
    kafka_bootstrap, topics, service, tmp_path
):
    good_png = png_bytes(sample_diagram(0, (320, 240)))
    image_root = tmp_path / "images"
    (image_root / "subdir").mkdir(parents=True)
    (image_root / "good.png").write_bytes(good_png)
    (tmp_path / "outside.png").write_bytes(good_png)
    (image_root / "link-out.png").symlink_to(tmp_path / "outside.png")
    limit_topic_message_size(kafka_bootstrap, topics.output, OUTPUT_TOPIC_MAX_BYTES)

    with HostileServer() as server:
        server.files["good"] = good_png
        server.redirects["metadata"] = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
        server.redirects["localhost"] = server.url("/img/good", host="localhost")
        server.redirects["good"] = server.url("/img/good")
        server.redirects["presigned"] = server.url(f"/status/404?X-Amz-Signature={SECRET}-redirected")
        cases = hostile_cases(server, good_png)
        goods = good_events(server, good_png)
        produce(kafka_bootstrap, topics.input, [(case.name, case.value) for case in cases])
        runner = service(
            IMAGE_ROOT=str(image_root),
            IMAGE_ALLOWED_HOSTS="127.0.0.1",
            IMAGE_FETCH_TIMEOUT="2",
            IMAGE_MAX_BYTES=str(IMAGE_MAX_BYTES),
            IMAGE_MAX_DECODED_PIXELS="4000000",
            MAX_EVENT_BYTES=str(MAX_EVENT_BYTES),
            KAFKA_MESSAGE_MAX_BYTES=str(PRODUCER_MAX_BYTES),
            BATCH_SIZE="4",
        )
        dead = read_records(kafka_bootstrap, topics.dlq, len(cases), timeout=120)
        assert len(dead) == len(cases), runner.log()

        # The partition kept moving: good events after all of that are still described.
        produce(kafka_bootstrap, topics.input, [(name, value) for name, (value, _) in goods.items()])
        results = read_records(kafka_bootstrap, topics.output, len(goods), timeout=120)
        assert len(results) == len(goods), runner.log()

    sizes = {json.loads(m.value())["id"]: json.loads(m.value())["metadata"]["image_size"] for m in results}
    assert sizes == {name: size for name, (_, size) in goods.items()}

    # Exactly one dead letter per case, none for the good events, each saying what failed and why.
    dead = read_records(kafka_bootstrap, topics.dlq, len(cases) + 1, timeout=5)
    by_key = collections.defaultdict(list)
    for message in dead:
        by_key[message.key().decode()].append(message)
    assert sorted(by_key) == sorted(case.name for case in cases)
    for case in cases:
        (message,) = by_key[case.name]
        headers = {key: value.decode() for key, value in message.headers()}
        assert (headers["error.stage"], headers["error.reason"]) == (case.stage, case.reason), (case.name, headers)
        assert headers["error.message"] and headers["error.class"].endswith("Error")
        assert headers["source.topic"] == topics.input
        if case.value_omitted:
            assert message.value() is None and headers["error.value_omitted"] == str(len(case.value)), case.name
        else:
            assert message.value() == case.value and "error.value_omitted" not in headers, case.name
        if case.value and case.value.startswith(b'{"id": "'):
            assert headers["event.id"] == case.name
    # No secret from any URL in any header, and every header is UTF-8 (decoded above).
    leaks = [(key, name, value) for key, messages in by_key.items() for name, value in messages[0].headers()]
    assert not [leak for leak in leaks if SECRET.encode() in (leak[2] or b"")], "a URL secret reached a header"
    trickle = {k: v.decode() for k, v in by_key["server-trickles-bytes"][0].headers()}
    assert trickle["error.attempts"] == "3"  # a timeout is worth retrying; it was, then dead-lettered

    settled, committed, ends = committed_equals_end(kafka_bootstrap, topics.group, topics.input)
    assert settled, f"committed {committed} != end offsets {ends}"

    # Counted by stage and reason, and logged once each.
    _, body = http_get(runner.url + "/metrics")
    failures = {
        (sample.labels["stage"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(body.decode())
        if family.name == "diagram_event_failures"
        for sample in family.samples
        if sample.name == "diagram_event_failures_total"
    }
    assert failures == collections.Counter((case.stage, case.reason) for case in cases)
    log = runner.log_path.read_text(errors="replace")
    assert SECRET not in log, [line for line in log.splitlines() if SECRET in line][:3]
    dead_letter_lines = [line for line in log.splitlines() if "dead-lettering id=" in line]
    assert len(dead_letter_lines) == len(cases)
    for case in cases:
        if case.value and case.value.startswith(b'{"id": "'):
            assert sum(bool(re.search(rf"id={re.escape(case.name)} ", line)) for line in dead_letter_lines) == 1

    runner.signal()
    assert runner.wait(60) == 0, runner.log()
