"""TEST_HOOK: the one seam for fault injection, for tests that run the service as a subprocess.

`TEST_HOOK=package.module:function` names a function the service calls once at start, with its
Settings, before the model loads. A test's hook patches what it needs to make a fault happen on cue
(tests/hooks.py: a poll loop that stalls while a file exists). Never set in production: the service
says so in its log when it is.
"""

from __future__ import annotations

import importlib
import logging

from consumer.settings import Settings

logger = logging.getLogger(__name__)


def run_test_hook(settings: Settings) -> None:
    if not settings.test_hook:
        return
    logger.warning("TEST_HOOK=%s: fault injection for tests, never for production", settings.test_hook)
    module_name, _, function = settings.test_hook.partition(":")
    getattr(importlib.import_module(module_name), function or "install")(settings)
