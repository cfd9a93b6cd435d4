"""Bytes -> bounded 8-bit RGB images: what a decode worker (consumer/images/worker.py) runs.

The format is sniffed from the bytes and must be a raster format this service opens (PNG, JPEG, GIF,
WebP, BMP, TIFF); width x height from the header is checked against the pixel limit before any pixel
is decoded, with Pillow's own bomb guard as an error as well; the first frame of an animation is used
and the result is always 8-bit RGB, rotated by its EXIF orientation.

Work per image is bounded before decoding where the structure says what decoding would cost:

- CPU: a JPEG may have at most MAX_JPEG_SCANS scans (SOS markers, counted by walking its markers).
  Each scan of a progressive JPEG is another pass over every block of the image, so a file that
  repeats its last scan thousands of times costs minutes (27 ms per scan at 40 Mpx) while being
  small; real progressive JPEGs have about 10 (libjpeg's default script) and rarely over 20. The
  same walk refuses more than MAX_JPEG_SEGMENTS marker segments, which Pillow parses one by one in
  Python (`too_many_segments`).
- Memory: decoding and converting to RGB needs at most DECODE_BYTES_PER_PIXEL (8) bytes per pixel,
  so at most 8 x IMAGE_MAX_DECODED_PIXELS (320 MB at the default 40 Mpx) per image, beside the input
  bytes. Pillow holds RGB, RGBA, CMYK, LA, I and F at 4 bytes per pixel, L and P at 1, I;16 at 2;
  every conversion step below holds only its input and its output (at most 4 + 4), and the EXIF
  rotation is applied to the RGB result (4 + 4). The exception is a JPEG with more than one scan
  (progressive, or sequential with separate scans): libjpeg then also keeps every DCT coefficient,
  2 bytes per sample of each component (6 per pixel for 4:4:4 RGB, 3 for 4:2:0, 8 for CMYK), beside
  its output; libwebp holds two RGBA canvases and Pillow a copy of the frame (12 beside the image);
  libtiff decodes a whole strip or tile into a buffer of its raw size. Before any pixel is decoded,
  the image's own size plus that buffer is checked against the bound and the image is refused
  (`too_many_pixels`) past it: a progressive CMYK JPEG above 2/3 of the pixel limit, a progressive
  4:4:4 one above 4/5, a WebP above 1/2, a single-strip 16-bit RGBA TIFF above 2/3.

Neither check covers everything a decoder can be made to do (Pillow parses JPEG markers, GIF
extension blocks, TIFF directories and BMP RLE runs in Python, and libtiff's strip buffers follow the
file's own layout), so the worker running this is also held to IMAGE_DECODE_TIMEOUT seconds of CPU
and to this memory bound plus slack by the kernel (RLIMIT_CPU, RLIMIT_DATA): see worker.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from consumer.errors import DecodeError

# The Pillow plugins allowed to parse the bytes at all: fewer parsers, fewer ways in (EPS, for one,
# would run Ghostscript). JPEG's opener also opens MPO, the multi-picture JPEG some cameras write.
RASTER_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

MAX_JPEG_SCANS = 64
"""More scans than this and a JPEG is refused (`too_many_scans`) before it is decoded: 64 extra scans
cost about 1.7 s of CPU at 40 Mpx, and no encoder's progressive script comes near."""

MAX_JPEG_SEGMENTS = 1000
"""More marker segments than this (in the first image) and a JPEG is refused (`too_many_segments`):
Pillow parses each in Python, so 20 MB of empty comment segments cost 5.7 s of CPU. A progressive
JPEG has a few dozen; large ICC profiles and XMP split into chunks add tens more."""

DECODE_BYTES_PER_PIXEL = 8
"""The memory one image may take to decode and convert, per pixel of IMAGE_MAX_DECODED_PIXELS."""

_JPEG_SOI = b"\xff\xd8\xff"
_OUT_OF_MEMORY = (
    "image needs more memory to {what} than it may use (about "
    f"{DECODE_BYTES_PER_PIXEL} bytes x IMAGE_MAX_DECODED_PIXELS); downscale it or save it in a simpler form"
)
_WHITE = (255, 255, 255)
# EXIF orientation -> the transposition that displays the image upright (as ImageOps.exif_transpose).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# 16- and 32-bit integer grey to 8 bits: the top byte of 0..65535, larger values white, negative black.
_INTEGER_TO_8_BIT = [value >> 8 for value in range(65536)]


def decode_image(data: bytes, pixel_limit: int) -> Image.Image:
    """Bytes -> 8-bit RGB image. Raises only `DecodeError`: not a raster image, too many pixels or
    scans for the bounds above, or corrupt. The pixel count comes from the header and is checked
    before any pixel is decoded."""
    if not data:
        raise DecodeError("image is empty (0 bytes)", reason="empty")
    _refuse_non_raster(data)
    markers = count_jpeg_markers(data) if data.startswith(_JPEG_SOI) else JpegMarkers(0, 0)
    if markers.scans > MAX_JPEG_SCANS:
        raise DecodeError(
            f"JPEG has more than {MAX_JPEG_SCANS} scans (SOS markers); each is another pass over the "
            "whole image, so it is refused as too costly to decode. Re-save it as a baseline or "
            "ordinary progressive JPEG",
            reason="too_many_scans",
        )
    if markers.segments > MAX_JPEG_SEGMENTS:
        raise DecodeError(
            f"JPEG has more than {MAX_JPEG_SEGMENTS} marker segments before its image ends; each is "
            "parsed on its own, so it is refused as too costly to decode. Re-save it without the "
            "extra metadata",
            reason="too_many_segments",
        )
    scans = markers.scans
    limit = pixel_limit
    try:
        # Pillow's own guard stays on: Image.open itself raises past twice MAX_IMAGE_PIXELS.
        image: Image.Image = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
        width, height = image.size
        if width * height > limit:
            raise DecodeError(
                f"image is {width}x{height} = {width * height} pixels, over the {limit}-pixel limit "
                "(IMAGE_MAX_DECODED_PIXELS); downscale it before sending",
                reason="too_many_pixels",
            )
        _refuse_over_memory_bound(image, scans, limit)
        # Image.open leaves an animation (GIF, APNG, WebP, MPO, multi-page TIFF) on its first
        # frame; asking for n_frames would walk every frame, so nothing here does.
        image.load()
        # Read before converting: a TIFF's orientation lives in its own tags, which conversion drops.
        orientation = _ORIENTATIONS.get(image.getexif().get(0x0112, 1))
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(
            f"image is too large to decode safely ({exc}); the limit is {limit} pixels (IMAGE_MAX_DECODED_PIXELS)",
            reason="too_many_pixels",
        ) from None
    except UnidentifiedImageError:
        raise DecodeError(
            "bytes are not a supported raster image (PNG, JPEG, GIF, WebP, BMP, TIFF)", reason="not_an_image"
        ) from None
    except MemoryError:
        raise DecodeError(_OUT_OF_MEMORY.format(what="decode"), reason="out_of_memory") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on malformed input
        message = f"image is corrupt or truncated: {type(exc).__name__}: {exc}"
        raise DecodeError(message[:500], reason="corrupt") from None
    mode = image.mode
    try:
        # One step at a time, rebinding `image`, so each step holds only its input and its output.
        while (step := rgb_step(image)) is not None:
            image = step(image)
        if orientation is not None:
            image = image.transpose(orientation)
    except MemoryError:
        raise DecodeError(_OUT_OF_MEMORY.format(what="convert to RGB"), reason="out_of_memory") from None
    except (ValueError, OSError) as exc:
        message = f"image mode {mode} cannot be converted to RGB: {exc}"
        raise DecodeError(message[:500], reason="unsupported_mode") from None
    return image


@dataclass(frozen=True)
class JpegMarkers:
    """What walking a JPEG's markers found in its first image, each count stopping one past its cap."""

    scans: int
    segments: int


def count_jpeg_markers(
    data: bytes, max_scans: int = MAX_JPEG_SCANS, max_segments: int = MAX_JPEG_SEGMENTS
) -> JpegMarkers:
    """The scans (SOS segments) and marker segments in the first image of a JPEG, each counted no
    further than one past its maximum. Markers are walked by their lengths; entropy-coded data is
    skipped to the next byte pair that is a marker (not a stuffed 0xFF00 or a restart marker), as a
    decoder reads it. A segment's payload (an EXIF thumbnail, say) is never searched, so its scans do
    not count; the walk ends at the first EOI (an MPO's next images follow it)."""
    scans = segments = 0
    position = 2  # after SOI
    end = len(data)
    while position + 1 < end and scans <= max_scans and segments <= max_segments:
        if data[position] != 0xFF:
            # Garbage between segments: a decoder skips to the next marker, and so does this.
            position = data.find(b"\xff", position)
            if position < 0:
                break
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:  # EOI
            break
        segments += 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if position + 3 >= end:
            break
        length = (data[position + 2] << 8) | data[position + 3]
        position += 2 + length
        if marker != 0xDA:
            continue
        scans += 1
        while True:  # the scan's entropy-coded data, up to the next real marker
            position = data.find(b"\xff", position)
            if position < 0 or position + 1 >= end:
                return JpegMarkers(scans, segments)
            following = data[position + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                position += 2
            elif following == 0xFF:
                position += 1
            else:
                break
    return JpegMarkers(scans, segments)


def count_jpeg_scans(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """The number of scans in the first image of a JPEG, counting no further than `stop_after` + 1."""
    return count_jpeg_markers(data, max_scans=stop_after, max_segments=len(data)).scans


def _refuse_over_memory_bound(image: Image.Image, scans: int, pixel_limit: int) -> None:
    """Refuse an image whose decoder needs more than DECODE_BYTES_PER_PIXEL x the pixel limit:
    the decoded image itself, plus what its decoder holds beside it while it runs."""
    width, height = image.size
    pixels = width * height
    output = pixels * _MODE_BYTES.get(image.mode, 4)
    extra, why = _decoder_buffer_bytes(image, scans)
    needed, bound = output + extra, DECODE_BYTES_PER_PIXEL * pixel_limit
    if needed > bound:
        raise DecodeError(
            f"{image.format} {image.mode} image of {width}x{height} needs about {needed // 1_000_000} MB to "
            f"decode ({why}), over the {bound // 1_000_000} MB bound ({DECODE_BYTES_PER_PIXEL} bytes x "
            f"IMAGE_MAX_DECODED_PIXELS); downscale it{_SIMPLER.get(str(image.format), '')}",
            reason="too_many_pixels",
        )


# Pillow's storage per pixel, by mode; everything else (RGB, RGBA, CMYK, I, F, LA...) is 4 bytes.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_SIMPLER = {
    "JPEG": " or save it as a baseline RGB JPEG",
    "MPO": " or save it as a baseline RGB JPEG",
    "TIFF": " or save it with smaller strips",
    "WEBP": " or send it as PNG",
}


def _decoder_buffer_bytes(image: Image.Image, scans: int) -> tuple[int, str]:
    """What the decoder holds beside the decoded image, where that is more than a few rows."""
    width, height = image.size
    if image.format in ("JPEG", "MPO") and scans > 1:
        # libjpeg keeps every DCT coefficient of a multi-scan JPEG: 64 of 2 bytes per 8x8 block.
        components: list[tuple[int, int, int, int]] = getattr(image, "layer", [])
        if not components:
            return 0, ""
        max_h = max(h for _, h, _, _ in components)
        max_v = max(v for _, _, v, _ in components)
        blocks = sum(
            _ceil_div(_ceil_div(width * h, max_h), 8) * _ceil_div(_ceil_div(height * v, max_v), 8)
            for _, h, v, _ in components
        )
        kind = "progressive" if image.info.get("progressive") else f"{scans}-scan"
        return blocks * 64 * 2, f"a {kind} JPEG keeps every DCT coefficient while it decodes"
    if image.format == "WEBP":
        # libwebp's canvas and its previous-frame canvas, and the frame copied out to Pillow.
        return width * height * 12, "libwebp holds two canvases and a copy of the frame"
    if image.format == "TIFF":
        # libtiff decodes a whole strip or tile at a time into a buffer of its raw size (4 bytes a
        # pixel at least: YCbCr and JPEG-compressed ones go through RGBA).
        tags = getattr(image, "tag_v2", {})
        bits = tags.get(258, (8,))
        raw_bytes_per_pixel = max(sum(bits if isinstance(bits, tuple) else (bits,)) / 8, 4)
        if 322 in tags and 323 in tags:
            area = int(tags[322]) * int(tags[323])
        else:
            area = width * min(int(tags.get(278, height)), height)
        return int(area * raw_bytes_per_pixel), "libtiff decodes a whole strip or tile at a time"
    return 0, ""


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _refuse_non_raster(data: bytes) -> None:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%pdf"):
        raise DecodeError("PDF is not a raster image; render the page to PNG first", reason="not_raster")
    if head.startswith(b"%!ps"):
        raise DecodeError("PostScript is not a raster image; render it to PNG first", reason="not_raster")
    if b"<svg" in head[:512]:
        raise DecodeError("SVG is not a raster image; render it to PNG first", reason="not_raster")
    if head.startswith((b"<!doctype html", b"<html")):
        raise DecodeError(
            "got an HTML page, not an image (an error or login page?); check the reference", reason="not_an_image"
        )


def rgb_step(image: Image.Image) -> Callable[[Image.Image], Image.Image] | None:
    """The next step from `image` towards 8-bit RGB, or None once it is RGB. Palette, alpha, CMYK,
    16-bit, 32-bit and float images all get there; transparency becomes white.

    One step at a time, so that a caller rebinding its only reference (`image = step(image)`) holds
    at most one step's input and output: 4 + 4 bytes per pixel at the most (bench/image_memory.py)."""
    mode = image.mode
    if mode == "RGB":
        return None
    if mode == "I;16":
        # Scaled to 8 bits in the 16-bit image itself; converting directly would clip above 255 to white.
        return lambda grey: grey.point(lambda value: value * (1 / 256)).convert("L")
    if mode in ("I;16B", "I;16L", "I;16N"):
        return lambda grey: grey.convert("I")
    if mode == "I":
        return lambda grey: grey.point(_INTEGER_TO_8_BIT, "L")  # 4 + 1 bytes, no 32-bit intermediate
    if mode == "F":
        return lambda grey: grey.convert("L")
    if mode == "La":
        return lambda premultiplied: premultiplied.convert("LA")
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "RGBa"):
        return lambda translucent: translucent.convert("RGBA")
    if mode in ("RGBA", "LA"):
        return _on_white
    return lambda other: other.convert("RGB")


def _on_white(translucent: Image.Image) -> Image.Image:
    """RGBA or LA composited on white, weighted by alpha: one RGB image beside the input."""
    rgb = Image.new("RGB", translucent.size, _WHITE)
    rgb.paste(translucent, mask=translucent)
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (see `rgb_step`), without EXIF rotation. The caller's reference keeps the
    original alive throughout; `decode_image` avoids that by rebinding its own."""
    while (step := rgb_step(image)) is not None:
        image = step(image)
    return image
