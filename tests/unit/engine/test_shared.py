"""SharedEngine: the pipeline and POST /infer share one model, one call at a time, failures kept apart."""

from __future__ import annotations

import threading
import time

from PIL import Image

from consumer.engine.base import Generation, GenerationBatch, GenerationRequest
from consumer.engine.shared import SharedEngine, _Rider


class RecordingEngine:
    """Answers each image with its width, records batch sizes and overlapping calls, fails on width 1."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.active = 0
        self.overlaps = 0

    def generate(self, requests):
        self.active += 1
        self.overlaps += self.active > 1
        time.sleep(0.01)
        self.active -= 1
        self.batches.append(len(requests))
        if any(r.image.size[0] == 1 for r in requests):
            raise ValueError("bad image")
        return GenerationBatch([Generation(text=str(r.image.size[0]), output_tokens=1) for r in requests], 0.01)

    def prepare_image(self, image):
        return None


def request(width: int) -> GenerationRequest:
    return GenerationRequest(image=Image.new("RGB", (width, 1)), prompt="p")


def test_waiting_infer_images_ride_in_the_pipelines_next_batch():
    engine = RecordingEngine()
    shared = SharedEngine(engine, batch_size=4)
    riders = [_Rider(request(width)) for width in (10, 11, 12)]
    shared._waiting.extend(riders)
    assert [g.text for g in shared.generate([request(2), request(3)]).generations] == ["2", "3"]
    assert engine.batches == [4]  # two free seats taken, the third rider waits for the next call
    assert [r.generation.text for r in riders[:2]] == ["10", "11"] and not riders[2].done.is_set()


def test_pipeline_and_infer_never_run_the_model_at_once():
    engine = RecordingEngine()
    shared = SharedEngine(engine, batch_size=3)
    answers: dict[int, str] = {}

    def infer(width: int) -> None:
        answers[width] = shared.infer(request(width))[0].text

    def pipeline() -> None:
        for width in range(100, 110):
            assert shared.generate([request(width)]).generations[0].text == str(width)

    threads = [threading.Thread(target=infer, args=(w,)) for w in range(10, 30)] + [threading.Thread(target=pipeline)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == {w: str(w) for w in range(10, 30)}
    assert engine.overlaps == 0 and max(engine.batches) <= 3


def test_a_bad_infer_image_does_not_fail_the_pipelines_images():
    engine = RecordingEngine()
    shared = SharedEngine(engine, batch_size=4)
    rider = _Rider(request(1))
    shared._waiting.append(rider)
    assert [g.text for g in shared.generate([request(5), request(6)]).generations] == ["5", "6"]
    assert rider.done.is_set() and isinstance(rider.error, ValueError)
