"""Peak memory of decoding hostile and maximum-size images, one fresh subprocess per case.

    python bench/image_memory.py            # prints a markdown table (the one in bench/README.md)
    python bench/image_memory.py --json     # the same numbers as JSON

Each case runs `ImageResolver.resolve` on a path reference under a temporary IMAGE_ROOT with the
service's default limits (IMAGE_MAX_DECODED_PIXELS=40,000,000). The number reported is the growth of
the process's peak RSS (ru_maxrss) across that one call, after the interpreter, Pillow and the file's
bytes are already in memory, so it is what one more image in flight costs a fetch worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (what it is, how it is made)
CASES = {
    "png-bomb-100000x100000": "PNG header claiming 100,000 x 100,000 RGB (10 Gpx, 30 GB decoded), zlib zeros as data",
    "png-bomb-8000x8000": "PNG header claiming 8,000 x 8,000 (64 Mpx: over our limit, under Pillow's error threshold)",
    "png-bomb-6000x6000-decoded": "a real 6,000 x 6,000 all-black PNG (36 Mpx, under the limit) of about 100 KiB",
    "png-max-rgb-diagram": "a legitimate 8,000 x 5,000 RGB diagram PNG (exactly the 40 Mpx limit)",
    "png-max-rgba": "a legitimate 8,000 x 5,000 RGBA PNG (alpha composited on white: the most conversions)",
    "jpeg-max-cmyk": "a legitimate 8,000 x 5,000 CMYK JPEG (converted to RGB)",
    "png-max-16-bit": "a legitimate 8,000 x 5,000 16-bit greyscale PNG (scaled to 8 bits)",
}


def _png(width: int, height: int, raw_rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw_rows, 9)) + chunk(b"IEND", b"")
    )


def make(name: str, path: Path) -> None:
    """Write case `name` to `path` (run in its own subprocess, so the parent stays small)."""
    from devtools.samples import sample_diagram

    if name == "png-bomb-100000x100000":
        data = _png(100_000, 100_000, bytes(8 * 1024 * 1024))  # the first rows' worth of zeros
    elif name == "png-bomb-8000x8000":
        data = _png(8000, 8000, bytes(8 * 1024 * 1024))
    elif name == "png-bomb-6000x6000-decoded":
        data = _png(6000, 6000, bytes(6000 * (1 + 6000 * 3)))  # each row: filter byte 0, then black pixels
    else:
        image = sample_diagram(0, (8000, 5000))
        if name == "png-max-16-bit":
            image = image.convert("L").point(lambda value: value * 256, "I").convert("I;16")
        if name == "png-max-rgba":
            image = image.convert("RGBA")
            image.putalpha(200)
        fmt = "JPEG" if name.startswith("jpeg") else "PNG"
        if name == "jpeg-max-cmyk":
            image = image.convert("CMYK")
        image.save(path, fmt)
        return
    path.write_bytes(data)


def measure(name: str, root: Path) -> dict:
    """Resolve the case's file once and report the peak-RSS growth (run in its own subprocess)."""
    from consumer.errors import ProcessingError
    from consumer.events import ImageRef
    from consumer.images import ImageResolver
    from consumer.settings import Settings

    resolver = ImageResolver(Settings(image_root=root, image_max_bytes=200 * 1024 * 1024))
    data = (root / name).read_bytes()  # page the file in, so the growth below is decoding only
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        loaded = resolver.resolve(ImageRef(path=name))
        outcome = f"decoded {loaded.size[0]}x{loaded.size[1]} {loaded.image.mode}"
    except ProcessingError as error:
        outcome = f"refused: {error.stage}/{error.reason}"
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": name, "file_bytes": len(data), "outcome": outcome, "peak_rss_increase_mb": (after - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--make", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("CASE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make(args.make[0], Path(args.make[1]))
        return
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return

    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for name in CASES:
            subprocess.run([sys.executable, __file__, "--make", name, str(root / name)], check=True, env=env)
            done = subprocess.run(
                [sys.executable, __file__, "--measure", name, str(root)],
                check=True,
                env=env,
                capture_output=True,
                text=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| case | file | outcome | peak RSS increase |")
    print("|---|---:|---|---:|")
    for row in rows:
        size = row["file_bytes"]
        shown = f"{size / 1024:.0f} KiB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.1f} MiB"
        print(
            f"| {row['case']}: {CASES[row['case']]} | {shown} | {row['outcome']} "
            f"| {row['peak_rss_increase_mb']:.1f} MB |"
        )


if __name__ == "__main__":
    main()
