"""Sample diagrams: swimlane flowcharts drawn with Pillow, for the demo, tests and benchmarks."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw

PROCESSES = [
    [
        ("Submit request", "Employee"),
        ("Review request", "Manager"),
        ("Approve budget", "Finance"),
        ("Notify", "System"),
    ],
    [("Start of process", "System"), ("Fill in form", "Client"), ("Check documents", "Clerk"), ("Archive", "System")],
    [
        ("Receive order", "Sales"),
        ("Pick items", "Warehouse"),
        ("Pack", "Warehouse"),
        ("Ship", "Courier"),
        ("Invoice", "Finance"),
    ],
    [("Report incident", "User"), ("Triage", "Support"), ("Fix", "Engineer"), ("Verify", "Support")],
]


def draw_diagram(steps: list[tuple[str, str]], size: tuple[int, int] = (1024, 768)) -> Image.Image:
    """A swimlane flowchart: one lane per role, one box per step, arrows in order."""
    width, height = size
    roles = list(dict.fromkeys(role for _, role in steps))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lane_height = height / len(roles)
    for index, role in enumerate(roles):
        top = int(index * lane_height)
        draw.rectangle([0, top, width - 1, int(top + lane_height) - 1], outline=(90, 90, 90), width=2)
        draw.text((10, top + 10), role, fill=(0, 0, 0))
    box_width = (width - 140) / len(steps)
    centers = []
    for index, (label, role) in enumerate(steps):
        lane = roles.index(role)
        left = 120 + index * box_width + 10
        top = lane * lane_height + lane_height / 2 - 30
        box = [left, top, left + box_width - 30, top + 60]
        draw.rounded_rectangle(box, radius=10, outline=(20, 60, 160), width=3, fill=(225, 235, 255))
        draw.text((box[0] + 8, box[1] + 22), f"{index + 1}. {label}", fill=(0, 0, 0))
        centers.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box))
    for (_, _, a), (_, _, b) in zip(centers, centers[1:], strict=False):
        start = (a[2], (a[1] + a[3]) / 2)
        end = (b[0], (b[1] + b[3]) / 2)
        draw.line([start, end], fill=(0, 0, 0), width=2)
        draw.polygon([end, (end[0] - 10, end[1] - 5), (end[0] - 10, end[1] + 5)], fill=(0, 0, 0))
    return image


def sample_diagram(index: int, size: tuple[int, int] = (1024, 768)) -> Image.Image:
    return draw_diagram(PROCESSES[index % len(PROCESSES)], size)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()
