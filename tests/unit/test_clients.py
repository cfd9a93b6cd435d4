"""fit_to_topic_limits without a broker: the producer config is left as it was, and the service starts.

With a broker (the limit read and applied, an oversized result dead-lettered alone):
tests/integration/test_delivery.py.
"""

from __future__ import annotations

import logging
import time

from consumer.clients import fit_to_topic_limits


def test_unreadable_topic_limits_leave_the_producer_config_unchanged(caplog):
    config = {"bootstrap.servers": "127.0.0.1:9", "enable.idempotence": True, "linger.ms": 5}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="consumer.clients"):
        assert fit_to_topic_limits(config, ["out", "dlq"], timeout=1.0) == config
    assert time.monotonic() - started < 5  # one bounded wait for both topics, not one each
    assert "cannot read max.message.bytes of out" in caplog.text
    assert "cannot read max.message.bytes of dlq" in caplog.text
