"""Decoding's own bounds: JPEG scans counted before decoding, multi-scan JPEGs held to the memory
bound, and every mode converted to RGB one step at a time with the right colours.

The refusals go through `ImageResolver.decode`, so through a decode worker, as events do; the scan
counter and the conversions are checked on their own as well.
"""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from consumer.errors import DecodeError
from consumer.images import ImageResolver
from consumer.settings import Settings


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def repeat_last_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG whose last scan is repeated `times` more times: each repeat is a few bytes
    and another pass over every block of the image. The last scan starts at the last SOS marker (no
    unescaped 0xFFDA can occur in entropy-coded data) and runs to EOI."""
    assert jpeg.endswith(b"\xff\xd9")
    last_scan = jpeg[jpeg.rfind(b"\xff\xda") : -2]
    return jpeg[:-2] + last_scan * times + b"\xff\xd9"


def progressive(size: tuple[int, int], mode: str = "RGB", **options) -> bytes:
    """A flat progressive JPEG: its last scan (an AC refinement with nothing to refine) is 14 bytes."""
    return encode(Image.new(mode, size, "white"), "JPEG", progressive=True, **options)


@pytest.fixture(scope="module")
def decoding() -> ImageResolver:
    return ImageResolver(Settings())


@pytest.fixture(scope="module")
def decoding_one_megapixel() -> ImageResolver:
    return ImageResolver(Settings(image_max_decoded_pixels=1_000_000))


def refused(call, *args) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        call(*args)
    return caught.value


# -- scans -------------------------------------------------------------------------------------------


def test_a_jpeg_that_repeats_its_last_scan_is_refused_before_decoding(decoding):
    """Before: decoded, at ~2 ms of CPU per repeated scan at 4 Mpx (27 ms at 40 Mpx): 2,000 repeats
    in 28 KB took 4 s; a 1 MB event minutes."""
    bomb = repeat_last_scan(progressive((2000, 2000)), 2000)
    assert len(bomb) < 64_000
    error = refused(decoding.decode, bomb)
    assert error.reason == "too_many_scans" and "scans" in error.message


def test_a_progressive_jpeg_up_to_the_scan_limit_decodes(decoding):
    from consumer.images.decode import MAX_JPEG_SCANS, count_jpeg_scans

    ordinary = progressive((64, 48))
    at_limit = repeat_last_scan(ordinary, MAX_JPEG_SCANS - count_jpeg_scans(ordinary))
    assert count_jpeg_scans(at_limit) == MAX_JPEG_SCANS
    for data in (ordinary, at_limit):
        decoded = decoding.decode(data)
        assert decoded.mode == "RGB" and decoded.size == (64, 48)
    assert refused(decoding.decode, repeat_last_scan(at_limit, 1)).reason == "too_many_scans"


def test_scans_are_counted_by_walking_markers_not_by_searching_bytes():
    from consumer.images.decode import count_jpeg_scans

    baseline = encode(Image.new("RGB", (32, 32), "red"), "JPEG")
    assert count_jpeg_scans(baseline) == 1
    assert 2 <= count_jpeg_scans(progressive((32, 32))) <= 12
    assert 2 <= count_jpeg_scans(progressive((32, 32), "L")) <= 12
    # SOS bytes inside a comment segment (as in an embedded EXIF thumbnail) are payload, not scans.
    comment_payload = b"\xff\xda" * 500
    comment = b"\xff\xfe" + struct.pack(">H", len(comment_payload) + 2) + comment_payload
    assert count_jpeg_scans(baseline[:2] + comment + baseline[2:]) == 1
    # Counting stops just past the limit: a huge bomb is not walked to its end.
    assert count_jpeg_scans(repeat_last_scan(baseline, 10_000), stop_after=5) == 6
    # A second image after EOI (MPO) is not the first image's business.
    assert count_jpeg_scans(baseline + baseline) == 1


def test_a_jpeg_made_of_countless_marker_segments_is_refused_before_pillow_parses_them(decoding):
    """Pillow parses each segment in Python: 20 MB of empty comment segments took 5.7 s of CPU."""
    from consumer.images.decode import MAX_JPEG_SEGMENTS, count_jpeg_markers

    baseline = encode(Image.new("RGB", (32, 32), "red"), "JPEG")
    empty_comment = b"\xff\xfe\x00\x02"
    within = baseline[:2] + empty_comment * (MAX_JPEG_SEGMENTS - 20) + baseline[2:]
    assert count_jpeg_markers(within).segments <= MAX_JPEG_SEGMENTS
    assert decoding.decode(within).size == (32, 32)
    bomb = baseline[:2] + empty_comment * 1_000_000 + baseline[2:]
    assert count_jpeg_markers(bomb).segments == MAX_JPEG_SEGMENTS + 1  # the walk stops there
    error = refused(decoding.decode, bomb)
    assert error.reason == "too_many_segments" and "segments" in error.message


# -- memory -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, options, accepted",
    [
        ("CMYK", {}, False),  # 8 bytes of coefficients + 4 of output per pixel
        ("RGB", {"subsampling": 0}, False),  # 4:4:4: 6 + 4
        ("RGB", {"subsampling": 2}, True),  # 4:2:0: 3 + 4
        ("L", {}, True),  # 2 + 1
    ],
)
def test_a_progressive_jpeg_is_held_to_the_memory_bound(decoding_one_megapixel, mode, options, accepted):
    """Before: decoded whatever it cost: a progressive CMYK JPEG at 8000x5000 peaked at +459 MB."""
    data = progressive((1000, 1000), mode, **options)
    if accepted:
        assert decoding_one_megapixel.decode(data).size == (1000, 1000)
    else:
        error = refused(decoding_one_megapixel.decode, data)
        assert error.reason == "too_many_pixels" and "MB" in error.message and "progressive" in error.message


def test_baseline_jpegs_and_smaller_progressive_ones_are_not_held_back(decoding_one_megapixel):
    assert decoding_one_megapixel.decode(encode(Image.new("CMYK", (1000, 1000)), "JPEG")).size == (1000, 1000)
    assert decoding_one_megapixel.decode(progressive((800, 800), "CMYK")).size == (800, 800)


def tiff_header_only(width: int, height: int, bits: tuple[int, ...], rows_per_strip: int) -> bytes:
    """A little-endian deflate TIFF with one strip of `rows_per_strip` rows, without its pixel data:
    enough for Pillow to open it and for the memory check to refuse it before decoding."""
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, len(bits), None),  # BitsPerSample: written after the directory
        (259, 3, 1, 8),  # deflate
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, 0),  # StripOffsets
        (277, 3, 1, len(bits)),
        (278, 4, 1, rows_per_strip),
        (279, 4, 1, 16),  # StripByteCounts
        (338, 3, 1, 2),  # ExtraSamples: unassociated alpha
    ]
    directory_size = 2 + 12 * len(entries) + 4
    bits_offset = 8 + directory_size
    directory = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if value is None:
            directory += struct.pack("<HHII", tag, kind, count, bits_offset)
        elif kind == 3:
            directory += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            directory += struct.pack("<HHII", tag, kind, count, value)
    directory += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack(f"<{len(bits)}H", *bits) + bytes(16)


def test_webp_and_tiff_strip_buffers_are_held_to_the_memory_bound(decoding_one_megapixel):
    """Found by bench/image_memory.py: libwebp needs 16 bytes a pixel in all, a single-strip TIFF its
    strip's raw size beside the image; past the bound they were cut off by the worker's memory limit
    mid-decode and reported as corrupt."""
    webp = encode(Image.new("RGB", (1000, 1000), "white"), "WEBP", lossless=True)
    error = refused(decoding_one_megapixel.decode, webp)
    assert error.reason == "too_many_pixels" and "libwebp" in error.message
    assert decoding_one_megapixel.decode(encode(Image.new("RGB", (700, 700)), "WEBP")).size == (700, 700)

    error = refused(decoding_one_megapixel.decode, tiff_header_only(1000, 1000, (16, 16, 16, 16), 1000))
    assert error.reason == "too_many_pixels" and "strip" in error.message
    many_strips = refused(decoding_one_megapixel.decode, tiff_header_only(1000, 1000, (16, 16, 16, 16), 8))
    assert many_strips.reason == "corrupt"  # past the bound check; its pixel data is simply missing
    rgba_tiff = encode(Image.new("RGBA", (1000, 1000)), "TIFF", compression="tiff_adobe_deflate")
    assert decoding_one_megapixel.decode(rgba_tiff).size == (1000, 1000)


# -- conversions --------------------------------------------------------------------------------------


def pixels(image: Image.Image) -> list:
    return [image.getpixel((x, 0)) for x in range(image.width)]


def grey_row(mode: str, values: list[int | float]) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


def test_32_bit_integer_and_float_tiffs_become_grey_rgb(decoding):
    integer = decoding.decode(encode(grey_row("I", [-5, 0, 32768, 65535, 1_000_000]), "TIFF"))
    assert pixels(integer) == [(0, 0, 0), (0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 255, 255)]
    floating = decoding.decode(encode(grey_row("F", [0.0, 127.6, 300.0]), "TIFF"))
    assert [red for red, _, _ in pixels(floating)] == [0, 127, 255]


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBa", (128, 0, 0, 128), (255, 127, 127)),
        ("LA", (0, 128), (127, 127, 127)),
        ("La", (0, 255), (0, 0, 0)),
        ("PA", (0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 0, 0), (255, 0, 255)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
        ("I;16B", 65535, (255, 255, 255)),
        ("I;16", 32768, (128, 128, 128)),
        ("F", 64.0, (64, 64, 64)),
    ],
)
def test_every_mode_reaches_rgb_with_its_colour(mode, colour, expected):
    from consumer.images.decode import to_rgb

    converted = to_rgb(Image.new(mode, (2, 2), colour))
    assert converted.mode == "RGB" and converted.getpixel((1, 1)) == pytest.approx(expected, abs=1)


def test_a_tiff_orientation_tag_is_applied(decoding):
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red top-left
    data = encode(image, "TIFF", tiffinfo={0x0112: 6})  # "rotate 90 CW to display"
    decoded = decoding.decode(data)
    assert decoded.size == (20, 40)
    assert decoded.getpixel((15, 5))[0] > 200 and decoded.getpixel((15, 5))[1] < 60
