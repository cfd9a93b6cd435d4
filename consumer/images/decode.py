"""Bytes -> bounded 8-bit RGB images.

The format is sniffed from the bytes and must be a raster format this service opens; width x height
from the header is checked against the pixel limit before any pixel is decoded, with Pillow's own bomb
guard as an error as well; the first frame of an animation is used and the result is always 8-bit
RGB, rotated by its EXIF orientation.
"""

from __future__ import annotations

import io

from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from consumer.errors import DecodeError

# The Pillow plugins allowed to parse the bytes at all: fewer parsers, fewer ways in (EPS, for one,
# would run Ghostscript). JPEG's opener also opens MPO, the multi-picture JPEG some cameras write.
RASTER_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


def decode_image(data: bytes, pixel_limit: int) -> Image.Image:
    """Bytes -> 8-bit RGB image. Raises only `DecodeError`: not a raster image, too many pixels,
    or corrupt. The pixel count comes from the header and is checked before any pixel is decoded."""
    if not data:
        raise DecodeError("image is empty (0 bytes)", reason="empty")
    _refuse_non_raster(data)
    limit = pixel_limit
    try:
        # Pillow's own guard stays on: Image.open itself raises past twice MAX_IMAGE_PIXELS.
        image = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
        width, height = image.size
        if width * height > limit:
            raise DecodeError(
                f"image is {width}x{height} = {width * height} pixels, over the {limit}-pixel limit "
                "(IMAGE_MAX_DECODED_PIXELS); downscale it before sending",
                reason="too_many_pixels",
            )
        # Image.open leaves an animation (GIF, APNG, WebP, MPO, multi-page TIFF) on its first
        # frame; asking for n_frames would walk every frame, so nothing here does.
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
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
        raise DecodeError("image needs more memory to decode than is available", reason="out_of_memory") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on malformed input
        message = f"image is corrupt or truncated: {type(exc).__name__}: {exc}"
        raise DecodeError(message[:500], reason="corrupt") from None
    try:
        return to_rgb(image)
    except (ValueError, OSError) as exc:
        message = f"image mode {image.mode} cannot be converted to RGB: {exc}"
        raise DecodeError(message[:500], reason="unsupported_mode") from None


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


def to_rgb(image: Image.Image) -> Image.Image:
    """Palette, alpha, CMYK, 16-bit and float images to 8-bit RGB; transparency becomes white.

    Written for peak memory at the pixel limit (bench/image_memory.py): no step keeps more than one
    full-size intermediate alive beside the input.
    """
    if image.mode == "I;16":
        # Scaled to 8 bits in the 16-bit image itself; converting directly would clip above 255 to white.
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    elif image.mode in ("I;16B", "I;16L", "I;16N", "I"):
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        transparency = ImageChops.invert(rgba.getchannel("A"))
        rgb = rgba.convert("RGB")
        del rgba
        rgb.paste((255, 255, 255), mask=transparency)  # white, weighted by how transparent each pixel is
        return rgb
    return image if image.mode == "RGB" else image.convert("RGB")
