"""The README's first command: the demo prints descriptions read back from the output topic."""

import os
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.integration


def test_demo_prints_descriptions_and_the_dead_letter(kafka_bootstrap):
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DEMO_MODEL": "tiny", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "devtools", "demo", "--count", "3"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TINY RANDOM-WEIGHT" in done.stdout  # the demo says plainly that its descriptions are noise
    assert done.stdout.count("\n--- diagram-") == 3
    assert "--- dead letter broken: [fetch]" in done.stdout
    assert "4/4 events answered" in done.stdout
    assert "adapter b," in done.stdout and "adapter default," in done.stdout  # the tiny model's two adapters
