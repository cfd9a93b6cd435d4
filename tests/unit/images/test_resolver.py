"""Image references from other services: what is fetched, what is refused, and what comes out.

URL cases run against a real HTTP(S) server on loopback (tests/hostile_http.py); path cases against
real files, symlinks and FIFOs; decode cases against images Pillow writes. Property tests feed
arbitrary bytes and text, lone surrogates included: the only exceptions allowed out are the
project's typed errors, and every message they carry is printable UTF-8 of bounded length.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from consumer.errors import DecodeError, FetchError
from consumer.events import ImageRef
from consumer.images import ImageResolver, address_is_public, parse_image_url
from consumer.settings import Settings
from tests.hostile_http import TLS_DIR, HostileServer

PROPERTY = hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def resolver(**overrides) -> ImageResolver:
    return ImageResolver(Settings(**{"image_fetch_timeout": 2.0, **overrides}))


# Decoding starts a worker process per resolver (about 0.3 s), so decode tests share these two.
DECODER = resolver()
ONE_MEGAPIXEL = resolver(image_max_decoded_pixels=1_000_000)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD_PNG = encode(Image.new("RGB", (40, 30), (10, 20, 30)), "PNG")


@pytest.fixture(scope="module")
def server():
    with HostileServer() as running:
        running.files["good"] = GOOD_PNG
        running.files["text"] = b"just some text, served as image/png"
        yield running


def refused(call, *args) -> FetchError | DecodeError:
    with pytest.raises((FetchError, DecodeError)) as caught:
        call(*args)
    return caught.value


# -- URLs: which addresses ---------------------------------------------------------------------------


def test_a_host_that_resolves_to_loopback_is_refused_unless_allowed_and_then_fetched(server):
    url = server.url("/img/good", host="localhost")
    before = len(server.requests)
    error = refused(resolver().fetch_url, url)
    assert error.reason == "forbidden_address" and not error.retryable
    assert "127.0.0.1" in error.message and "IMAGE_ALLOWED_HOSTS" in error.message
    assert len(server.requests) == before, "a refused host must not be contacted at all"

    assert resolver(image_allowed_hosts="localhost").fetch_url(url) == GOOD_PNG
    # The checked address was dialled, and the request still names the host it was meant for.
    assert server.requests[-1] == ("/img/good", f"localhost:{server.port}")


def test_allowing_one_spelling_of_loopback_does_not_allow_the_others(server):
    allow_ip = resolver(image_allowed_hosts="127.0.0.1")
    assert allow_ip.fetch_url(server.url("/img/good")) == GOOD_PNG
    for host in ("localhost", "2130706433", "0177.0.0.1", "127.1", "0x7f.0.0.1"):
        assert refused(allow_ip.fetch_url, server.url("/img/good", host=host)).reason == "forbidden_address", host


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://[::127.0.0.1]/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://[fec0::1]/",
        "http://224.0.0.1/",
        "http://[ff02::1]/",
        "http://255.255.255.255/",
        "http://240.0.0.1/",
        "http://[2002:7f00:1::]/",
        "http://[64:ff9b::7f00:1]/",
        "http://198.18.0.1/",
        "https://10.0.0.1/",
    ],
)
def test_non_public_addresses_in_every_spelling_are_refused(url):
    error = refused(resolver().fetch_url, url)
    assert error.reason == "forbidden_address", error.message


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("2002:808:808::", True),
        ("127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),
        ("2002:a9fe:a9fe::", False),
        ("100.127.255.255", False),
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
    ],
)
def test_embedded_ipv4_forms_are_judged_by_their_ipv4_part(address, public):
    assert address_is_public(address) is public


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://example.com/a.png", "bad_scheme"),
        ("file:///etc/passwd", "bad_scheme"),
        ("gopher://127.0.0.1:6379/_INFO", "bad_scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "bad_scheme"),
        ("//example.com/a.png", "bad_scheme"),
        ("http:///a.png", "bad_url"),
        ("http://example.com:99999/", "bad_url"),
        ("http://[::1/", "bad_url"),
        ("http://example.com/a b.png", "bad_url"),
        ("http://example.com/a.png\r\nX-Injected: 1", "bad_url"),
        ("http://" + "a" * 70 + ".com/", "bad_url"),
        ("http://example.com/" + "a" * 9000, "bad_url"),
        ("http://example.com:0/", "bad_url"),
    ],
)
def test_urls_that_are_not_plain_http_are_refused_with_the_field_named(url, reason):
    error = refused(resolver().fetch_url, url)
    assert error.reason == reason
    assert "image.url" in error.message


def test_data_url_in_the_url_field_points_to_the_base64_field():
    assert "image.base64" in refused(resolver().fetch_url, "data:image/png;base64,AAAA").message


# -- URLs: redirects -----------------------------------------------------------------------------------


def test_redirects_are_checked_like_the_first_request(server):
    server.redirects["metadata"] = "http://169.254.169.254/latest/meta-data/iam/"
    server.redirects["loopback-name"] = server.url("/img/good", host="localhost")
    server.redirects["file"] = "file:///etc/passwd"
    server.redirects["allowed"] = server.url("/img/good")
    fetcher = resolver(image_allowed_hosts="127.0.0.1")
    for name, reason in [
        ("metadata", "forbidden_address"),
        ("loopback-name", "forbidden_address"),
        ("file", "bad_scheme"),
    ]:
        error = refused(fetcher.fetch_url, server.url(f"/redirect/{name}"))
        assert error.reason == reason, name
        assert "redirect" in error.message
    assert fetcher.fetch_url(server.url("/redirect/allowed")) == GOOD_PNG


def test_a_redirect_loop_ends_after_three_redirects(server):
    before = len(server.requests)
    error = refused(resolver(image_allowed_hosts="127.0.0.1").fetch_url, server.url("/loop"))
    assert error.reason == "too_many_redirects"
    assert len(server.requests) - before == 4  # the request and three redirects


# -- URLs: what the server sends ------------------------------------------------------------------------


@pytest.mark.timeout(60)  # a guard, not a measurement: without the total timeout these never end
@pytest.mark.parametrize("path", ["/trickle", "/slow-headers", "/declared-huge"])
def test_a_server_that_trickles_bytes_is_cut_off(server, path):
    fetcher = resolver(image_allowed_hosts="127.0.0.1", image_fetch_timeout=1.0, image_max_bytes=10**13)
    error = refused(fetcher.fetch_url, server.url(path))
    assert error.reason == "timeout" and error.retryable
    assert "IMAGE_FETCH_TIMEOUT" in error.message


@pytest.mark.parametrize("path", ["/endless", "/declared-huge"])
def test_a_body_over_the_byte_limit_is_refused_while_streaming(server, path):
    error = refused(resolver(image_allowed_hosts="127.0.0.1", image_max_bytes=1_000_000).fetch_url, server.url(path))
    assert error.reason == "too_large" and "IMAGE_MAX_BYTES" in error.message


def test_a_content_length_that_lies_low_yields_only_what_it_declared(server):
    fetcher = resolver(image_allowed_hosts="127.0.0.1")
    data = fetcher.fetch_url(server.url("/short-declared/good"))
    assert data == GOOD_PNG[: len(GOOD_PNG) // 4]
    assert refused(fetcher.decode, data).reason == "corrupt"


def test_a_content_length_that_lies_high_is_a_broken_connection(server):
    error = refused(resolver(image_allowed_hosts="127.0.0.1").fetch_url, server.url("/long-declared/good"))
    assert error.reason == "connection" and error.retryable


@pytest.mark.parametrize("path", ["/huge-header", "/many-headers"])
def test_huge_or_countless_headers_are_a_malformed_response(server, path):
    assert refused(resolver(image_allowed_hosts="127.0.0.1").fetch_url, server.url(path)).reason == "bad_response"


def test_content_encoding_is_not_decompressed_so_a_gzip_bomb_stays_small(server):
    fetcher = resolver(image_allowed_hosts="127.0.0.1")
    data = fetcher.fetch_url(server.url("/gzip-bomb"))
    assert len(data) == len(server.gzip_bomb) < 1_000_000  # not the 64 MiB it inflates to
    assert refused(fetcher.decode, data).reason == "not_an_image"


def test_http_errors_say_the_status_and_only_server_errors_are_retried(server):
    fetcher = resolver(image_allowed_hosts="127.0.0.1")
    not_found = refused(fetcher.fetch_url, server.url("/status/404"))
    assert not_found.reason == "http_404" and not not_found.retryable and "404" in not_found.message
    unavailable = refused(fetcher.fetch_url, server.url("/status/503"))
    assert unavailable.reason == "http_503" and unavailable.retryable


def test_the_format_comes_from_the_bytes_not_the_content_type(server):
    fetcher = resolver(image_allowed_hosts="127.0.0.1")
    assert refused(fetcher.resolve, ImageRef(url=server.url("/img/text"))).reason == "not_an_image"


# -- URLs: TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def tls_server():
    with HostileServer(tls=True) as running:
        running.files["good"] = GOOD_PNG
        yield running


def test_https_checks_the_certificate_against_the_url_host_while_dialling_the_checked_address(tls_server, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS_DIR / "ca.pem"))  # trust the test CA, as an operator would
    fetcher = resolver(image_allowed_hosts="localhost,127.0.0.1")
    assert fetcher.fetch_url(tls_server.url("/img/good", host="localhost")) == GOOD_PNG
    # Same server and address, but the certificate names only "localhost": the name is what is checked.
    error = refused(fetcher.fetch_url, tls_server.url("/img/good", host="127.0.0.1"))
    assert error.reason == "tls" and not error.retryable


def test_https_with_an_untrusted_certificate_is_refused(tls_server, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)
    error = refused(resolver(image_allowed_hosts="localhost").fetch_url, tls_server.url("/img/good", host="localhost"))
    assert error.reason == "tls" and "certificate" in error.message


# -- paths ---------------------------------------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(GOOD_PNG)
    (tmp_path / "secret.png").write_bytes(GOOD_PNG)
    (root / "escape").symlink_to(tmp_path / "secret.png")
    (root / "escape-dir").symlink_to(tmp_path)
    (root / "inside-link.png").symlink_to(root / "sub" / "ok.png")
    os.mkfifo(root / "fifo")
    return root


def test_paths_inside_the_root_are_read(image_root):
    fetcher = resolver(image_root=image_root)
    assert fetcher.read_path("sub/ok.png") == GOOD_PNG
    assert fetcher.read_path(str(image_root / "sub" / "ok.png")) == GOOD_PNG
    assert fetcher.read_path("inside-link.png") == GOOD_PNG
    assert fetcher.read_path("sub/../sub/ok.png") == GOOD_PNG


@pytest.mark.parametrize(
    "reference, reason",
    [
        ("../secret.png", "outside_root"),
        ("sub/../../secret.png", "outside_root"),
        ("/etc/passwd", "outside_root"),
        ("escape", "outside_root"),
        ("escape-dir/secret.png", "outside_root"),
        ("sub", "not_a_file"),
        ("", "not_a_file"),
        ("fifo", "not_a_file"),
        ("sub/ok.png\x00.txt", "bad_path"),
        ("missing.png", "not_found"),
    ],
)
def test_paths_that_leave_the_root_or_are_not_files_are_refused(image_root, reference, reason):
    error = refused(resolver(image_root=image_root).read_path, reference)
    assert error.reason == reason, error.message
    assert "image.path" in error.message or "IMAGE_ROOT" in error.message


def test_without_an_image_root_paths_are_refused(image_root):
    assert refused(resolver().read_path, str(image_root / "sub" / "ok.png")).reason == "path_disabled"


def test_a_file_over_the_byte_limit_is_refused(image_root):
    error = refused(resolver(image_root=image_root, image_max_bytes=100).read_path, "sub/ok.png")
    assert error.reason == "too_large"


# -- base64 --------------------------------------------------------------------------------------------


def test_base64_with_mime_line_breaks_or_a_data_url_prefix_decodes():
    fetcher = resolver()
    text = base64.b64encode(GOOD_PNG).decode()
    wrapped = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert fetcher.decode_base64(text) == GOOD_PNG
    assert fetcher.decode_base64(wrapped + "\n") == GOOD_PNG
    assert fetcher.decode_base64("data:image/png;base64," + text) == GOOD_PNG


@pytest.mark.parametrize(
    "text",
    ["not base64!", "AAA", "AA=A", "////-_-_", "data:image/svg+xml,<svg/>", "data:image/png;base64", "QUJD\u00e9"],
)
def test_invalid_base64_is_refused(text):
    error = refused(resolver().decode_base64, text)
    assert error.reason == "invalid_base64" and "image.base64" in error.message


def test_base64_over_the_byte_limit_is_refused_before_decoding():
    fetcher = resolver(image_max_bytes=1000)
    assert fetcher.decode_base64(base64.b64encode(bytes(1000)).decode()) == bytes(1000)
    error = refused(fetcher.decode_base64, base64.b64encode(bytes(1003)).decode())
    assert error.reason == "too_large" and "IMAGE_MAX_BYTES" in error.message
    assert refused(fetcher.decode_base64, "!" * 10_000_000).reason == "too_large"  # not even scanned


# -- decoding ------------------------------------------------------------------------------------------


def test_palette_with_transparency_becomes_rgb_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    decoded = DECODER.decode(encode(image, "PNG", transparency=0))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255) and decoded.getpixel((1, 0)) == (255, 0, 0)


def test_alpha_is_composited_on_white():
    decoded = DECODER.decode(encode(Image.new("RGBA", (4, 4), (0, 0, 255, 0)), "PNG"))
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)
    decoded = DECODER.decode(encode(Image.new("LA", (4, 4), (0, 255)), "PNG"))
    assert decoded.getpixel((0, 0)) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb_with_its_colour():
    decoded = DECODER.decode(encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95))
    red, green, blue = decoded.getpixel((8, 8))
    assert decoded.mode == "RGB" and red < 30 and green > 225 and blue > 225  # pure cyan


def test_16_bit_grey_is_scaled_not_clipped():
    image = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        image.putpixel((x, 0), value)
    decoded = DECODER.decode(encode(image, "PNG"))
    assert [decoded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 10))  # a red square top-left
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = DECODER.decode(encode(image, "JPEG", exif=exif, quality=95))
    assert decoded.size == (20, 40)
    red, green, _ = decoded.getpixel((15, 5))  # top-right after the rotation
    assert red > 200 and green < 60


def test_an_animation_yields_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue")]
    for fmt in ("GIF", "PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
        decoded = DECODER.decode(data)
        assert decoded.size == (8, 8) and decoded.getpixel((4, 4))[0] > 200, fmt


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"])
def test_every_accepted_format_decodes_to_rgb(fmt):
    decoded = DECODER.decode(encode(Image.new("RGB", (12, 7), (0, 0, 200)), fmt))
    assert decoded.mode == "RGB" and decoded.size == (12, 7)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    error = refused(DECODER.decode, bomb)
    assert error.reason == "too_many_pixels" and "IMAGE_MAX_DECODED_PIXELS" in error.message


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    error = refused(ONE_MEGAPIXEL.decode, png_header_only(1001, 1000))
    assert error.reason == "too_many_pixels" and "1001x1000" in error.message
    # Exactly at the limit the header passes and the (broken) pixel data is what fails.
    assert refused(ONE_MEGAPIXEL.decode, png_header_only(1000, 1000)).reason == "corrupt"


def test_a_truncated_image_is_corrupt():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    assert refused(DECODER.decode, data[: len(data) // 2]).reason == "corrupt"


@pytest.mark.parametrize(
    "data, reason, words",
    [
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>', "not_raster", "SVG"),
        (b"<svg width='10' height='10'></svg>", "not_raster", "SVG"),
        (b"%PDF-1.7\n%\xe2\xe3\n1 0 obj", "not_raster", "PDF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not_raster", "PostScript"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "not_an_image", "HTML"),
        (b"GIF89a", "not_an_image", "PNG, JPEG"),  # a signature alone is not an image
        (b"hello", "not_an_image", "PNG, JPEG"),
        (b"", "empty", "empty"),
    ],
)
def test_things_that_are_not_raster_images_say_what_they_are(data, reason, words):
    error = refused(DECODER.decode, data)
    assert error.reason == reason and words in error.message


def test_formats_outside_the_list_are_not_parsed():
    for fmt in ("ICO", "PCX", "TGA", "PPM"):
        assert refused(DECODER.decode, encode(Image.new("RGB", (8, 8)), fmt)).reason == "not_an_image", fmt


# -- properties: any input, only typed errors ----------------------------------------------------------


def _valid_images() -> list[bytes]:
    base = Image.effect_noise((24, 16), 40).convert("RGB")
    images = [encode(base, fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")]
    images.append(encode(base.convert("P"), "PNG", transparency=3))
    images.append(encode(base.convert("CMYK"), "JPEG"))
    images.append(encode(base.convert("RGB"), "GIF", save_all=True, append_images=[base.rotate(90)]))
    return images


VALID_IMAGES = _valid_images()


@st.composite
def damaged_images(draw) -> bytes:
    """A valid image with some bytes overwritten, then maybe truncated: what reaches a decoder's corners."""
    data = bytearray(draw(st.sampled_from(VALID_IMAGES)))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


MESSAGE_BOUND = 1000  # consumer.images.shown.MAX_MESSAGE_CHARS


def assert_shown_safely(error: FetchError | DecodeError) -> None:
    """The message rule: valid UTF-8 (it becomes a Kafka header) and bounded."""
    error.message.encode("utf-8")
    assert len(error.message) <= MESSAGE_BOUND, len(error.message)


# Characters that have broken or could break messages and logs: lone surrogates, NUL and other
# controls, bidirectional overrides and marks, line and paragraph separators, a BOM, URL delimiters.
AWKWARD = st.sampled_from(
    [
        "\ud800",
        "\udfff",
        "\x00",
        "\x1b",
        "\x7f",
        "\u202e",
        "\u200f",
        "\u2028",
        "\ufeff",
        "%",
        "@",
        ":",
        "#",
        "?",
        "[",
        "\\",
    ]
)
any_character = st.one_of(st.characters(exclude_categories=()), AWKWARD)  # surrogates included
any_text = st.text(any_character, max_size=60)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # Pillow on damaged headers
@PROPERTY
@given(st.one_of(st.binary(max_size=2048), damaged_images()))
def test_decode_raises_only_decode_errors(data):
    try:
        image = ONE_MEGAPIXEL.decode(data)
    except DecodeError as error:
        assert_shown_safely(error)
        return
    assert image.mode == "RGB"


@PROPERTY
@given(st.one_of(st.text(max_size=300), any_text, st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())))
def test_decode_base64_raises_only_fetch_errors(text):
    try:
        resolver(image_max_bytes=100).decode_base64(text)
    except FetchError as error:
        assert_shown_safely(error)


@PROPERTY
@given(st.one_of(st.text(max_size=200), st.builds("http://{}/{}".format, st.text(max_size=40), st.text(max_size=40))))
def test_url_parsing_raises_only_fetch_errors(url):
    try:
        target = parse_image_url(url)
    except FetchError as error:
        assert_shown_safely(error)
        return
    assert target.scheme in ("http", "https") and target.host and 0 < target.port < 65536


def no_public_dns(host: str, port: int) -> list[str]:
    """Every name is private here: the fetch is refused before it connects anywhere."""
    return ["10.0.0.1"]


FETCHER = resolver(image_fetch_timeout=0.5)
FETCHER.fetcher.resolve_host = no_public_dns

arbitrary_urls = st.one_of(
    any_text,
    st.builds("{}://{}/{}".format, st.sampled_from(["http", "https", "HTTP", "ftp", ""]), any_text, any_text),
    st.builds(
        "http://{}@{}/{}?{}#{}".format,
        any_text,
        st.sampled_from(["h", "10.0.0.1", "[::1]"]),
        any_text,
        any_text,
        any_text,
    ),
    # Very long: past MAX_URL_CHARS, and long runs of characters that are escaped when shown.
    st.builds(
        lambda filler, count, tail: f"http://h/{filler * count}{tail}", AWKWARD, st.integers(0, 12_000), any_text
    ),
)


@PROPERTY
@given(url=arbitrary_urls)
def test_fetching_any_unicode_url_raises_only_fetch_errors_with_messages_that_can_be_sent(url):
    """Lone surrogates, NUL, RTL marks, very long: a FetchError whose message is UTF-8 and bounded.
    Before: a surrogate in the path or query escaped as UnicodeEncodeError."""
    try:
        FETCHER.fetch_url(url)
    except FetchError as error:
        assert_shown_safely(error)
    else:
        pytest.fail(f"fetched {url!r}, though every name resolves to a private address here")


@pytest.fixture(scope="module")
def property_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("property-root")
    (root / "a.png").write_bytes(GOOD_PNG)
    (root / "up").symlink_to("..")
    return root


@PROPERTY
@given(reference=st.one_of(st.text(max_size=100), any_text))
def test_path_reading_raises_only_fetch_errors(property_root, reference):
    try:
        data = resolver(image_root=property_root).read_path(reference)
    except FetchError as error:
        assert_shown_safely(error)
        return
    assert data == GOOD_PNG


def test_a_prepared_image_lets_its_pixels_go_and_keeps_its_size():
    """Events wait for a batch with the engine's features only, not the decoded image as well."""
    loaded = DECODER.resolve(ImageRef(base64=base64.b64encode(GOOD_PNG).decode()))
    width_height = loaded.image.size
    assert loaded.with_prepared(None) is loaded  # nothing prepared (echo engine, or it failed): keep it
    prepared = loaded.with_prepared(features := object())
    assert prepared.image is None and prepared.prepared is features
    assert prepared.size == width_height and prepared.source_bytes == loaded.source_bytes
