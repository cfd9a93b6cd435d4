"""The Kafka clients: their configuration beyond Settings, statistics and logs wired in, and errors.

Constructors here make no network call except `fit_to_topic_limits`, which asks the brokers once at
start for the output topics' record size limits, and `ensure_retry_topics`, which creates the retry
topics RETRY_DELAYS needs once at start.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from consumer.logs import kafka_client_logger
from consumer.metrics import Metrics
from consumer.settings import Settings
from consumer.stages.base import FatalLatch
from consumer.state import ServiceState

logger = logging.getLogger(__name__)

STATS_INTERVAL_MS = 5000
"""librdkafka statistics (consumer lag per partition, broker states) every this often, unless
KAFKA_STATISTICS_INTERVAL_MS says otherwise. Emitting them costs one JSON document per interval."""
ERROR_LOG_INTERVAL_S = 30.0
"""librdkafka repeats a connection error every few milliseconds while a broker is down."""
# Room left under a topic's max.message.bytes for the record batch's own framing (61 bytes of
# header, up to about 20 bytes and the headers per record).
TOPIC_LIMIT_MARGIN = 1024
LIBRDKAFKA_BATCH_SIZE = 1_000_000
"""librdkafka's default batch.size."""

ConsumerFactory = Callable[[dict[str, Any]], Consumer]
ProducerFactory = Callable[[dict[str, Any]], Producer]


def transactional_id(settings: Settings) -> str:
    """TRANSACTIONAL_ID if set; else `<group>-<replica>` (`Settings.replica_name`: the
    group.instance.id under static membership, else `<hostname>-<pid>`): unique among live replicas,
    and the same again when a container restarts in its pod, so the new instance fences the old one
    and aborts its open transaction at once instead of after transaction.timeout.ms. Zombies of a
    rebalance are fenced by the group generation in `send_offsets_to_transaction` (KIP-447), whatever
    the id."""
    if settings.transactional_id:
        return settings.transactional_id
    return f"{settings.kafka_group_id}-{settings.replica_name()}"


def producer_config(settings: Settings) -> dict[str, Any]:
    """The producer's librdkafka config for the chosen guarantee."""
    config = settings.producer_config()
    if settings.processing_guarantee == "exactly_once":
        config["transactional.id"] = transactional_id(settings)
    return config


def admin_config(config: dict[str, Any]) -> dict[str, Any]:
    """An admin client's config from a producer's: its connection, security and client.id settings only.
    An admin client with the idempotence or transactional.id of the producer would register as a
    producer with the broker."""
    not_for_admin = {"error_cb", "enable.idempotence", "transactional.id", "acks", "linger.ms", "compression.type"}
    return {key: value for key, value in config.items() if key not in not_for_admin}


def fit_to_topic_limits(config: dict[str, Any], topics: list[str], timeout: float = 10.0) -> dict[str, Any]:
    """`config` with the producer's batch.size lowered under what every one of `topics` accepts.

    The broker refuses a whole record batch when it exceeds the topic's max.message.bytes, so one
    oversized result would take the small results batched with it down too. librdkafka never adds a
    record to a batch past batch.size, so with batch.size under the limit a batch of several records
    always fits, and an oversized record travels alone: the broker refuses it and nothing else, and
    its fallback (a dead letter) settles its input. The topics' configs are read once, here; where
    they cannot be read (broker down, no DescribeConfigs permission, topic not created yet) `config`
    is returned as it is.
    """
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._config import ConfigResource
    from confluent_kafka.admin._resource import ResourceType

    config_for_admin = admin_config(config)
    config_for_admin["logger"] = kafka_client_logger("librdkafka.admin")
    admin = AdminClient(config_for_admin)
    futures = admin.describe_configs(
        [ConfigResource(ResourceType.TOPIC, topic) for topic in topics], request_timeout=timeout
    )
    limits: dict[str, int] = {}
    for resource, future in futures.items():
        topic = resource.name
        try:
            limits[topic] = int(future.result(timeout)["max.message.bytes"].value)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the producer's batch.size as it is
            logger.warning(
                "cannot read max.message.bytes of %s (%s): if it is under batch.size, one record the "
                "broker refuses as too large takes the records batched with it down too",
                topic,
                exc,
            )
    if not limits:
        return config
    batch_size = max(1, min(limits.values()) - TOPIC_LIMIT_MARGIN)
    if batch_size >= int(config.get("batch.size", LIBRDKAFKA_BATCH_SIZE)):
        return config
    logger.info(
        "topics accept record batches up to %s bytes (max.message.bytes): producer batch.size=%d",
        ", ".join(f"{topic} {limit}" for topic, limit in limits.items()),
        batch_size,
    )
    return {**config, "batch.size": batch_size}


RETRY_TOPICS_WAIT_S = 10.0
"""How long start-up waits for newly created retry topics to have leaders before it subscribes."""


class RetryTopicsMissing(Exception):
    """A retry topic RETRY_DELAYS needs does not exist, and the brokers refused to create it."""


def ensure_retry_topics(settings: Settings, config: dict[str, Any], timeout: float = 10.0) -> None:
    """Create the retry topics (`Settings.retry_topics`) that do not exist yet, with the input topic's
    partition count, the brokers' default replication factor and their default retention (which must
    outlast the longest delay: 7 days unless changed).

    Raises `RetryTopicsMissing` when the brokers say a retry topic is missing and refuse to create it
    (no CREATE permission on it or the cluster, a creation policy): without it every transient failure
    would fail to publish and stop the replica, so the service does not start. Where the brokers
    cannot be asked (down, timed out) or the input topic does not exist yet, a warning is logged and
    the service goes on. A retry topic with another partition count than the input's is only warned
    about.
    """
    topics = settings.retry_topics()
    if not topics:
        return
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    config_for_admin = admin_config(config)
    config_for_admin["logger"] = kafka_client_logger("librdkafka.admin")
    admin = AdminClient(config_for_admin)

    def partition_counts() -> dict[str, int] | None:
        """Partition counts of the input and retry topics that exist (all partitions with a leader)."""
        try:
            metadata = admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            logger.warning("cannot check the retry topics %s exist (%s): going on", topics, exc.args[0])
            return None
        counts = {}
        for name in (settings.input_topic, *topics):
            topic = metadata.topics.get(name)
            if topic is not None and topic.error is None and topic.partitions:
                if all(partition.leader >= 0 for partition in topic.partitions.values()):
                    counts[name] = len(topic.partitions)
        return counts

    counts = partition_counts()
    if counts is None:
        return
    input_partitions = counts.get(settings.input_topic)
    for name in topics:
        if name in counts and input_partitions is not None and counts[name] != input_partitions:
            logger.warning(
                "retry topic %s has %d partitions, the input topic %s %d: fewer limit how many replicas share "
                "the retries",
                name,
                counts[name],
                settings.input_topic,
                input_partitions,
            )
    missing = [name for name in topics if name not in counts]
    if not missing:
        return
    if input_partitions is None:
        logger.warning(
            "retry topics %s are missing and the input topic %s does not exist (or has no leader) yet: not "
            "created; create them with the input topic (deploy/, docs/delivery.md#retries)",
            missing,
            settings.input_topic,
        )
        return
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=input_partitions, replication_factor=-1) for name in missing],
        request_timeout=timeout,
    )
    refused = []
    for name, future in futures.items():
        try:
            future.result(timeout)
            logger.info("created retry topic %s with %d partitions", name, input_partitions)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            if error.retriable() or error.code() in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT):
                logger.warning("cannot create retry topic %s now (%s): going on", name, error)
                continue
            refused.append(f"{name}: {error.str()}")
    if refused:
        raise RetryTopicsMissing(
            f"retry topics for RETRY_DELAYS are missing and cannot be created ({'; '.join(refused)}): create them "
            f"with {input_partitions} partitions, as deploy/'s topic jobs do (docs/delivery.md#retries), or give "
            "this service's principal CREATE on them"
        )
    deadline = time.monotonic() + RETRY_TOPICS_WAIT_S
    while time.monotonic() < deadline:
        counts = partition_counts() or {}
        if all(name in counts for name in missing):
            return
        time.sleep(0.2)
    logger.warning("retry topics %s created, but without leaders after %.0f s", missing, RETRY_TOPICS_WAIT_S)


class KafkaErrors:
    """The clients' `error_cb`: broker outages go to /health, fatal errors trip the latch, and each kind
    of error is logged at most once per ERROR_LOG_INTERVAL_S."""

    def __init__(self, state: ServiceState, latch: FatalLatch) -> None:
        self.state, self.latch = state, latch
        self._logged: dict[int, float] = {}

    def __call__(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            # Back to True when librdkafka's statistics show a broker up again (observed_consumer_factory).
            # Not on a single _TRANSPORT error: brokers close idle connections, and that is no outage.
            self.state.broker_ok = False
        if error.fatal():
            self.latch.trip(KafkaException(error))
        self.log("kafka: %s", error)

    def log(self, text: str, error: KafkaError) -> None:
        now = time.monotonic()
        if now - self._logged.get(error.code(), -ERROR_LOG_INTERVAL_S) >= ERROR_LOG_INTERVAL_S:
            self._logged[error.code()] = now
            logger.warning(text, error)


def observed_consumer_factory(metrics: Metrics, state: ServiceState) -> ConsumerFactory:
    """Consumers that report lag and broker state (librdkafka statistics) and log through `logging`."""

    def on_stats(document: str) -> None:
        try:
            stats = json.loads(document)
        except ValueError:
            logger.debug("unreadable librdkafka statistics", exc_info=True)
            return
        metrics.observe_consumer_stats(stats)
        # error_cb marks the broker down when no broker answers; statistics say when it is back,
        # even while no message arrives to prove it.
        state.broker_ok = any(broker.get("state") == "UP" for broker in stats.get("brokers", {}).values())

    def build(config: dict[str, Any]) -> Consumer:
        return Consumer(
            {
                "statistics.interval.ms": STATS_INTERVAL_MS,
                **config,
                "stats_cb": on_stats,
                "logger": kafka_client_logger("librdkafka.consumer"),
            }
        )

    return build


def observed_producer_factory() -> ProducerFactory:
    return lambda config: Producer({**config, "logger": kafka_client_logger("librdkafka.producer")})
