"""RESULT_CACHE_TOPIC: the log-compacted topic the replicas share their answers through.

At start the service makes sure the topic exists (creating it compacted where its ACLs allow, and
otherwise saying that it must be created), then `CacheFollower` reads it from the beginning into the
replica's `ResultCache` before the replica reports ready, and goes on reading it while the replica
runs: an entry one replica writes is a hit for every other one a moment later. The follower assigns
itself every partition (no group membership, no commits: `group.id` is only a name librdkafka asks
for) and reads with isolation.level=read_committed, so under exactly-once it never sees an entry whose
transaction was aborted.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from consumer.clients import admin_config
from consumer.logs import kafka_client_logger
from consumer.result_cache.store import ResultCache
from consumer.settings import Settings

logger = logging.getLogger(__name__)

COMPACT = "compact"
CREATE_TIMEOUT_S = 30.0
POLL_S = 0.5
_NOT_FOR_A_READER = {"group.instance.id", "partition.assignment.strategy"}


class CacheTopicError(RuntimeError):
    """The cache topic does not exist and cannot be created by this replica."""


def ensure_cache_topic(settings: Settings, timeout: float = CREATE_TIMEOUT_S) -> None:
    """Make sure RESULT_CACHE_TOPIC exists: create it with cleanup.policy=compact (the broker's default
    partitions and replication) when it is missing; raise `CacheTopicError` when it is missing and
    cannot be created. An existing topic that is not compacted is used, with a warning."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._config import ConfigResource
    from confluent_kafka.admin._resource import ResourceType
    from confluent_kafka.cimpl import NewTopic

    topic = settings.result_cache_topic
    assert topic is not None
    config: dict[str, Any] = {
        **admin_config(settings.producer_config()),
        "logger": kafka_client_logger("librdkafka.admin"),
    }
    admin = AdminClient(config)
    try:
        # Every topic's metadata: asking for one by name may create it, uncompacted, where the broker
        # auto-creates topics.
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise CacheTopicError(f"cannot read the cluster's topics to find RESULT_CACHE_TOPIC={topic}: {exc}") from exc
    if topic not in existing:
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=-1, replication_factor=-1, config={"cleanup.policy": COMPACT})],
            request_timeout=timeout,
        )
        try:
            futures[topic].result(timeout)
            logger.info("created the result cache topic %s (cleanup.policy=compact)", topic)
            return
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return  # another replica created it meanwhile
            raise CacheTopicError(
                f"RESULT_CACHE_TOPIC={topic} does not exist and this replica cannot create it ({exc}). Create "
                f"it log-compacted (cleanup.policy=compact), e.g. `kafka-topics.sh --create --topic {topic} "
                "--config cleanup.policy=compact`, or unset RESULT_CACHE_TOPIC to run without a result cache"
            ) from exc
    try:
        resource = ConfigResource(ResourceType.TOPIC, topic)
        policy = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
        cleanup = policy["cleanup.policy"].value
    except Exception as exc:  # noqa: BLE001 - no DescribeConfigs permission: use the topic as it is
        logger.info("cannot read cleanup.policy of the result cache topic %s (%s)", topic, exc)
        return
    if COMPACT not in str(cleanup).split(","):
        logger.warning(
            "the result cache topic %s has cleanup.policy=%s, not compact: old entries are deleted by age "
            "instead of kept per key, and every start reads the whole log",
            topic,
            cleanup,
        )


def reader_config(settings: Settings) -> dict[str, Any]:
    """The follower's librdkafka config: the service's connection and security settings, no group."""
    config = {key: value for key, value in settings.consumer_config().items() if key not in _NOT_FOR_A_READER}
    return {
        **config,
        "group.id": f"{settings.kafka_group_id}-result-cache",  # required by librdkafka; never joined
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        "logger": kafka_client_logger("librdkafka.result-cache"),
    }


class CacheFollower:
    """A daemon thread that reads the cache topic into `cache`: from the beginning (`loaded` is set
    once every partition has been read to its end), then whatever is written to it, until `stop`."""

    def __init__(
        self, settings: Settings, cache: ResultCache, consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer
    ) -> None:
        assert settings.result_cache_topic is not None
        self.settings, self.cache, self.topic = settings, cache, settings.result_cache_topic
        self._consumer_factory = consumer_factory
        self._stopping = threading.Event()
        self.loaded = threading.Event()
        self.records_read = 0
        self._thread = threading.Thread(target=self._run, name="result-cache", daemon=True)

    def start(self) -> CacheFollower:
        self._thread.start()
        return self

    def wait_loaded(self, timeout: float) -> bool:
        """Wait until the topic has been read to its end; False when `timeout` passed first."""
        return self.loaded.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        started = time.monotonic()
        try:
            consumer = self._consumer_factory(reader_config(self.settings))
        except Exception:  # noqa: BLE001 - the replica serves without shared entries, never stops for it
            logger.exception(
                "cannot read the result cache topic %s: serving with what this replica generates", self.topic
            )
            self.loaded.set()
            return
        try:
            partitions = self._partitions(consumer)
            consumer.assign([TopicPartition(self.topic, partition, OFFSET_BEGINNING) for partition in partitions])
            unread = set(partitions)
            while not self._stopping.is_set():
                message = consumer.poll(POLL_S)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        unread.discard(message.partition() or 0)
                        if not unread and not self.loaded.is_set():
                            self._report_loaded(started)
                    else:
                        logger.warning("reading the result cache topic %s: %s", self.topic, error)
                    continue
                self.records_read += 1
                self.cache.put_record(message.key(), message.value())
        except Exception:  # noqa: BLE001
            logger.exception("the result cache follower stopped: entries of other replicas are no longer read")
        finally:
            self.loaded.set()
            consumer.close()

    def _partitions(self, consumer: Consumer) -> list[int]:
        deadline = time.monotonic() + CREATE_TIMEOUT_S
        while True:
            metadata = consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
            if metadata is not None and metadata.error is None and metadata.partitions:
                return sorted(metadata.partitions)
            if time.monotonic() > deadline or self._stopping.is_set():
                raise RuntimeError(f"no partitions of {self.topic}: {metadata.error if metadata else 'no metadata'}")
            time.sleep(0.5)  # a topic created a moment ago may not be in every broker's metadata yet

    def _report_loaded(self, started: float) -> None:
        logger.info(
            "result cache: read %s to its end in %.1f s: %d records, %d entries kept (%d bytes of at most %d)",
            self.topic,
            time.monotonic() - started,
            self.records_read,
            self.cache.entries,
            self.cache.size_bytes,
            self.cache.max_bytes,
        )
        self.loaded.set()
