"""CPU and peak memory of decoding hostile and maximum-size images, one fresh process per case.

    python bench/image_memory.py            # all cases: the table in bench/README.md, and
                                            # bench/results/image-memory.json with the machine
    python bench/image_memory.py --json     # print the JSON instead of the table
    python bench/image_memory.py --only jpeg-repeated-scans gif-max   # some cases; nothing written

Each case runs `ImageResolver.resolve` on a path reference under a temporary IMAGE_ROOT with the
service's default limits (IMAGE_MAX_DECODED_PIXELS=40,000,000, IMAGE_DECODE_TIMEOUT=10) except
IMAGE_MAX_BYTES, raised to 200 MB so that uncompressed maximum-size files (BMP) can be measured too.
Decoding happens in a decode worker process (consumer/images/worker.py), so two processes are
measured:

- the worker: its CPU seconds and the growth of its peak RSS for this one image, from
  RUSAGE_CHILDREN once it has exited (minus a worker that only started and decoded a 1x1 PNG);
- the service process: the growth of its peak RSS (ru_maxrss) across the call, after the
  interpreter, Pillow and the file's bytes are already in memory: the image's bytes as read, and the
  RGB result (Pillow's 4 bytes per pixel) as it arrives in strips.

Wall seconds are the whole `resolve` call: read, worker round trip, pixels back.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results" / "image-memory.json"
MAX_SIDE = (8000, 5000)  # 40 Mpx: the default IMAGE_MAX_DECODED_PIXELS

# name -> what it is
CASES = {
    "png-bomb-100000x100000": "PNG header claiming 100,000 x 100,000 RGB (10 Gpx, 30 GB decoded), zlib zeros as data",
    "png-bomb-8000x8000": "PNG header claiming 8,000 x 8,000 (64 Mpx: over our limit, under Pillow's error threshold)",
    "png-bomb-6000x6000-decoded": "a real 6,000 x 6,000 all-black PNG (36 Mpx, under the limit) of about 100 KiB",
    "png-idat-chunk-bomb": "a 64 x 64 PNG behind 1,600,000 empty IDAT chunks (Pillow walks them in Python)",
    "jpeg-repeated-scans": "a 2,000 x 2,000 progressive JPEG whose last scan is repeated to 1 MB (~70,000 scans)",
    "jpeg-comment-segment-bomb": "a 64 x 64 JPEG behind 5,000,000 empty comment segments (20 MiB)",
    "gif-comment-extension-bomb": "a 64 x 64 GIF behind 7,000,000 empty comment extensions (20 MiB)",
    "jpeg-max-64-scans": "an 8,000 x 5,000 progressive diagram JPEG with its last scan repeated up to 64 scans",
    "jpeg-max-progressive-cmyk": "an 8,000 x 5,000 progressive CMYK JPEG (8 bytes of DCT coefficients a pixel)",
    "jpeg-progressive-cmyk-26mpx": "a 6,400 x 4,000 progressive CMYK JPEG (26 Mpx: just under the memory bound)",
    "jpeg-max-progressive-rgb": "an 8,000 x 5,000 progressive RGB JPEG, 4:2:0 (Pillow's default)",
    "jpeg-max-cmyk": "a legitimate 8,000 x 5,000 baseline CMYK JPEG (converted to RGB)",
    "png-max-rgb-diagram": "a legitimate 8,000 x 5,000 RGB diagram PNG (exactly the 40 Mpx limit)",
    "png-max-rgba": "a legitimate 8,000 x 5,000 RGBA PNG (alpha composited on white)",
    "png-max-palette-alpha": "an 8,000 x 5,000 palette PNG with a transparent colour",
    "png-max-16-bit": "a legitimate 8,000 x 5,000 16-bit greyscale PNG (scaled to 8 bits)",
    "tiff-max-32-bit": "an 8,000 x 5,000 32-bit integer greyscale TIFF, deflate-compressed",
    "gif-max": "an 8,000 x 5,000 GIF",
    "webp-max": "an 8,000 x 5,000 lossless WebP (16 bytes a pixel to decode: over the bound)",
    "webp-19mpx": "a 5,600 x 3,500 lossless WebP (19.6 Mpx: under the bound)",
    "bmp-max": "an 8,000 x 5,000 24-bit BMP (120 MB uncompressed)",
}


def _png(width: int, height: int, raw_rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _repeat_last_scan(jpeg: bytes, times: int) -> bytes:
    """The last scan runs from the last SOS marker to EOI (no unescaped 0xFFDA in entropy-coded data)."""
    last_scan = jpeg[jpeg.rfind(b"\xff\xda") : -2]
    return jpeg[:-2] + last_scan * times + b"\xff\xd9"


def make(name: str, path: Path) -> None:
    """Write case `name` to `path` (run in its own subprocess, so the parent stays small)."""
    from PIL import Image

    from consumer.images.decode import MAX_JPEG_SCANS, count_jpeg_scans
    from devtools.samples import sample_diagram

    def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    if name == "png-bomb-100000x100000":
        data = _png(100_000, 100_000, bytes(8 * 1024 * 1024))  # the first rows' worth of zeros
    elif name == "png-bomb-8000x8000":
        data = _png(8000, 8000, bytes(8 * 1024 * 1024))
    elif name == "png-bomb-6000x6000-decoded":
        data = _png(6000, 6000, bytes(6000 * (1 + 6000 * 3)))  # each row: filter byte 0, then black pixels
    elif name == "png-idat-chunk-bomb":
        pixels = zlib.compress(b"\0" * (1 + 3 * 64) * 64)
        ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
        empty = _chunk(b"IDAT", b"") * 1_600_000
        data = b"\x89PNG\r\n\x1a\n" + ihdr + empty + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")
    elif name == "jpeg-repeated-scans":
        flat = encoded(Image.new("RGB", (2000, 2000), "white"), "JPEG", progressive=True)
        last_scan_bytes = len(flat) - 2 - flat.rfind(b"\xff\xda")
        data = _repeat_last_scan(flat, (1_000_000 - len(flat)) // last_scan_bytes)
    elif name == "jpeg-comment-segment-bomb":
        small = encoded(Image.new("RGB", (64, 64)), "JPEG")
        data = small[:2] + b"\xff\xfe\x00\x02" * 5_000_000 + small[2:]
    elif name == "gif-comment-extension-bomb":
        small = encoded(Image.new("P", (64, 64)), "GIF")
        descriptor = small.index(b"\x2c")  # the image descriptor: extensions go before it
        data = small[:descriptor] + b"\x21\xfe\x00" * 7_000_000 + small[descriptor:]
    elif name == "jpeg-max-64-scans":
        jpeg = encoded(sample_diagram(0, MAX_SIDE), "JPEG", progressive=True)
        data = _repeat_last_scan(jpeg, MAX_JPEG_SCANS - count_jpeg_scans(jpeg))
    elif name == "jpeg-max-progressive-cmyk":
        data = encoded(sample_diagram(0, MAX_SIDE).convert("CMYK"), "JPEG", progressive=True)
    elif name == "jpeg-progressive-cmyk-26mpx":
        data = encoded(sample_diagram(0, (6400, 4000)).convert("CMYK"), "JPEG", progressive=True)
    elif name == "jpeg-max-progressive-rgb":
        data = encoded(sample_diagram(0, MAX_SIDE), "JPEG", progressive=True)
    elif name == "jpeg-max-cmyk":
        data = encoded(sample_diagram(0, MAX_SIDE).convert("CMYK"), "JPEG")
    elif name == "png-max-rgb-diagram":
        data = encoded(sample_diagram(0, MAX_SIDE), "PNG")
    elif name == "png-max-rgba":
        image = sample_diagram(0, MAX_SIDE).convert("RGBA")
        image.putalpha(200)
        data = encoded(image, "PNG")
    elif name == "png-max-palette-alpha":
        data = encoded(sample_diagram(0, MAX_SIDE).convert("P"), "PNG", transparency=0)
    elif name == "png-max-16-bit":
        grey = sample_diagram(0, MAX_SIDE).convert("L").point(lambda value: value * 256, "I").convert("I;16")
        data = encoded(grey, "PNG")
    elif name == "tiff-max-32-bit":
        grey = sample_diagram(0, MAX_SIDE).convert("L").point(lambda value: value * 256, "I")
        data = encoded(grey, "TIFF", compression="tiff_adobe_deflate")
    elif name == "gif-max":
        data = encoded(sample_diagram(0, MAX_SIDE), "GIF")
    elif name == "webp-max":
        data = encoded(sample_diagram(0, MAX_SIDE), "WEBP", lossless=True)
    elif name == "webp-19mpx":
        data = encoded(sample_diagram(0, (5600, 3500)), "WEBP", lossless=True)
    elif name == "bmp-max":
        data = encoded(sample_diagram(0, MAX_SIDE), "BMP")
    else:
        raise ValueError(name)
    path.write_bytes(data)


def _worker_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/<pid>/stat (fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker_peak_kib(pid: int) -> int:
    """VmHWM of a live process: its own peak RSS since it exec'd. (RUSAGE_CHILDREN's ru_maxrss would
    also count the service's RSS at the moment it spawned the worker.)"""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))


def measure(name: str, root: Path) -> dict[str, object]:
    """Resolve the case's file once; report both processes' costs (run in its own subprocess)."""
    from consumer.errors import ProcessingError
    from consumer.events import ImageRef
    from consumer.images import ImageResolver
    from consumer.settings import Settings

    resolver = ImageResolver(Settings(image_root=root, image_max_bytes=200 * 1024 * 1024))
    resolver.decode(_png(1, 1, b"\0\0\0\0"))  # the worker starts before the clock, as in a running service
    (worker,) = resolver.decoder._idle  # the bench looks inside: which process to read in /proc
    pid = worker.process.pid
    cpu_before, peak_before = _worker_cpu_seconds(pid), _worker_peak_kib(pid)
    data = (root / name).read_bytes()  # page the file in, so the growth below is decoding only
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        loaded = resolver.resolve(ImageRef(path=name))
        assert loaded.image is not None
        outcome = f"decoded {loaded.size[0]}x{loaded.size[1]} {loaded.image.mode}"
    except ProcessingError as error:
        outcome = f"refused: {error.stage}/{error.reason}"
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    alive = worker in resolver.decoder._idle
    cpu_after = _worker_cpu_seconds(pid) if alive else None
    worker_peak = (_worker_peak_kib(pid) - peak_before) / 1024 if alive else None
    resolver.close()
    if cpu_after is None:  # the worker was ended (timeout, crash) and reaped: its total is a child's
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_after = usage.ru_utime + usage.ru_stime
    return {
        "case": name,
        "file_bytes": len(data),
        "outcome": outcome,
        "worker_cpu_s": round(cpu_after - cpu_before, 2),
        "wall_s": round(wall, 2),
        "worker_peak_rss_increase_mib": None if worker_peak is None else round(worker_peak, 1),
        "service_peak_rss_increase_mib": round((after - before) / 1024, 1),
    }


def machine() -> dict[str, object]:
    """What the numbers were measured on. The CPU flavour as the engine names it (AMX, AVX512-BF16 or
    AVX2; consumer/engine/device.py), read here without importing torch."""
    import platform

    import PIL

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    flavour = "amx" if "amx_bf16" in flags else "avx512-bf16" if "avx512_bf16" in flags else "avx2"
    return {
        "cpu": model or platform.processor(),
        "cpu_flavour": flavour,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="measure these cases only")
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
        for name in args.only or CASES:
            subprocess.run([sys.executable, __file__, "--make", name, str(root / name)], check=True, env=env)
            done = subprocess.run(
                [sys.executable, __file__, "--measure", name, str(root)],
                check=True,
                env=env,
                capture_output=True,
                text=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            (root / name).unlink()
            print(f"{name}: {rows[-1]['outcome']}", file=sys.stderr)
    report = {
        "command": "python bench/image_memory.py",
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "limits": {"IMAGE_MAX_DECODED_PIXELS": 40_000_000, "IMAGE_DECODE_TIMEOUT": 10.0, "IMAGE_MAX_BYTES": 200 << 20},
        "rows": rows,
    }
    if not args.only:
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("| case | file | outcome | worker CPU | wall | worker peak RSS increase | service peak RSS increase |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for row in rows:
        size = int(str(row["file_bytes"]))
        shown = f"{size / 1024:.0f} KiB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.1f} MiB"
        worker_peak = row["worker_peak_rss_increase_mib"]
        print(
            f"| {row['case']}: {CASES[str(row['case'])]} | {shown} | {row['outcome']} | {row['worker_cpu_s']:.2f} s "
            f"| {row['wall_s']:.2f} s | {'ended' if worker_peak is None else f'{worker_peak:.1f} MiB'} "
            f"| {row['service_peak_rss_increase_mib']:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
