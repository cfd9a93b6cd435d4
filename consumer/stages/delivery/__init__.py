"""Delivery, the last stage: how a batch's records reach Kafka, and when the input offsets behind them
count as done. Two guarantees behind one interface (`Delivery`): `AtLeastOnce` (the default) and
`ExactlyOnce`. Records of a partition that was revoked while their batch was generating are not sent:
the partition's new owner processes those events from the last committed offset.
"""

from __future__ import annotations

from confluent_kafka import Consumer, Producer

from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings
from consumer.stages.base import FatalLatch
from consumer.stages.delivery.at_least_once import AtLeastOnce
from consumer.stages.delivery.base import Delivery
from consumer.stages.delivery.exactly_once import ExactlyOnce
from consumer.state import ServiceState

__all__ = ["AtLeastOnce", "Delivery", "ExactlyOnce", "make_delivery"]


def make_delivery(
    settings: Settings,
    producer: Producer,
    consumer: Consumer,
    tracker: OffsetTracker,
    metrics: Metrics,
    latch: FatalLatch,
    state: ServiceState,
) -> Delivery:
    if settings.processing_guarantee == "exactly_once":
        return ExactlyOnce(producer, consumer, tracker, metrics, latch, state, revoke_timeout=settings.revoke_timeout)
    return AtLeastOnce(producer, consumer, tracker, metrics, latch, state)
