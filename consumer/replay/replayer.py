"""The replay run: read the dead-letter topic, decide, send, commit progress."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any, TextIO

from confluent_kafka import OFFSET_INVALID, Consumer, IsolationLevel, KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec

from consumer.clients import admin_config
from consumer.events import REPLAY_COUNT_HEADER
from consumer.logs import kafka_client_logger
from consumer.replay.selection import (
    BATCH_SIZE,
    METADATA_TIMEOUT,
    PROGRESS_INTERVAL,
    STALL_TIMEOUT,
    DeadLetter,
    RecordRef,
    Replay,
    ReplayError,
    ReplayExit,
    ReplayOptions,
    decide,
    read_dead_letter,
    replay_group,
)
from consumer.replay.sources import SourceReader
from consumer.settings import Settings

logger = logging.getLogger(__name__)

COORDINATOR_MOVING = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                      KafkaError.COORDINATOR_NOT_AVAILABLE}  # fmt: skip


class Progress:
    """A line on stderr: dead letters read of those to read, and what became of the matching ones."""

    def __init__(self, stream: TextIO, total: int, dry_run: bool, group: str) -> None:
        self.stream, self.total, self.dry_run, self.group = stream, total, dry_run, group
        self.tty = stream.isatty()
        self.read = 0
        self.counts: Counter[str] = Counter()
        self._shown_at = time.monotonic()  # a run shorter than one interval shows its final line only
        self._shown = ""

    def line(self) -> str:
        sent = "would send" if self.dry_run else "sent"
        done = f"{self.read}/{self.total}" if self.total else str(self.read)
        return (
            f"replay: {done} dead letters read, {self.counts['matched']} matching: {self.counts['send']} {sent}, "
            f"{self.counts['refused']} refused, {self.counts['unavailable']} unavailable"
            + (f", {self.counts['unreadable']} not this service's" if self.counts["unreadable"] else "")
        )

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        interval = PROGRESS_INTERVAL if self.tty else PROGRESS_INTERVAL * 10
        if not final and now - self._shown_at < interval:
            return
        line = self.line()
        if final:
            line += " (dry run: nothing sent or committed)" if self.dry_run else f" (progress: group {self.group})"
        elif line == self._shown:
            return
        self._shown_at, self._shown = now, line
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + ("\n" if final or not self.tty else ""))
        self.stream.flush()


class Replayer:
    """One run: reads, decides, sends, commits, reports. `run` returns the exit status."""

    def __init__(self, settings: Settings, options: ReplayOptions, out: TextIO, err: TextIO) -> None:
        self.settings, self.options, self.out, self.err = settings, options, out, err
        self.group = options.group or replay_group(settings, options.filters)

    # -- client configs ------------------------------------------------------------------------
    def _consumer_config(self) -> dict[str, Any]:
        config = self.settings.consumer_config()
        config.pop("group.instance.id", None)  # the service's static membership is not this tool's
        config.update(
            {
                "group.id": self.group,
                "client.id": self.settings.client_id(self.group),
                "enable.partition.eof": True,
                "logger": kafka_client_logger("librdkafka.replay"),
            }
        )
        return config

    def _producer_config(self) -> dict[str, Any]:
        config = self.settings.producer_config()
        config.pop("transactional.id", None)
        config.update(
            {"client.id": self.settings.client_id(self.group), "logger": kafka_client_logger("librdkafka.replay")}
        )
        return config

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        settings, options = self.settings, self.options
        logger.info(
            "replaying %s -> %s as group %s: %s%s",
            settings.dlq_topic,
            settings.input_topic,
            self.group,
            options.filters.describe(),
            " (dry run: nothing is sent or committed)" if options.dry_run else "",
        )
        consumer = Consumer(self._consumer_config())
        sources = Consumer({**self._consumer_config(), "group.id": f"{self.group}-sources"})
        producer = None if options.dry_run else Producer(self._producer_config())
        admin = AdminClient({**admin_config(self._producer_config())})
        progress: Progress | None = None
        failure: ReplayError | None = None
        try:
            dead_letter_partitions = self._partition_count(consumer, settings.dlq_topic)
            input_partitions = self._partition_count(consumer, settings.input_topic)
            ranges = self._ranges(consumer, admin, dead_letter_partitions)
            progress = Progress(
                self.err, sum(end - start for start, end in ranges.values()), options.dry_run, self.group
            )
            self._read(consumer, SourceReader(sources), producer, input_partitions, ranges, progress)
        except ReplayError as exc:
            failure = exc
        except KeyboardInterrupt:
            failure = ReplayError(
                "interrupted; progress is kept up to the last acknowledged batch", ReplayExit.INTERRUPTED
            )
        finally:
            sources.close()
            consumer.close()
            if producer is not None:
                producer.flush(METADATA_TIMEOUT)
        # Last, after the clients' own log lines, so the reason is what a person reads at the end.
        if progress is not None:
            progress.show(final=True)
        if failure is not None:
            self.err.write(f"replay: {failure}\n")
            return failure.exit_code
        return ReplayExit.DONE

    def _partition_count(self, consumer: Consumer, topic: str) -> int:
        try:
            metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT)
        except KafkaException as exc:
            raise ReplayError(
                f"cannot reach the Kafka brokers at {self.settings.kafka_bootstrap_servers} within "
                f"{METADATA_TIMEOUT:.0f} s ({exc.args[0].str()}); check KAFKA_BOOTSTRAP_SERVERS and the "
                "KAFKA_SECURITY_*/SASL_* settings",
                ReplayExit.UNREACHABLE,
            ) from None
        described = metadata.topics.get(topic)
        error = getattr(described, "error", None)
        if described is None or error is not None or not described.partitions:
            why = error.str() if isinstance(error, KafkaError) else "no such topic"
            raise ReplayError(f"topic {topic} cannot be read: {why}", ReplayExit.UNREACHABLE)
        return len(described.partitions)

    @staticmethod
    def _committed(consumer: Consumer, tps: list[KafkaTopicPartition]) -> dict[int, int]:
        """The group's committed offsets; a coordinator still loading or moving (a broker just started,
        a leader change) is asked again for up to METADATA_TIMEOUT."""
        deadline = time.monotonic() + METADATA_TIMEOUT
        while True:
            try:
                return {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=METADATA_TIMEOUT)}
            except KafkaException as exc:
                if not exc.args[0].retriable() and exc.args[0].code() not in COORDINATOR_MOVING:
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _ranges(self, consumer: Consumer, admin: AdminClient, partitions: int) -> dict[int, tuple[int, int]]:
        """Per dead-letter partition, the offsets to read: from the group's committed offset (or the
        start, or --since) to the last stable offset now."""
        topic, since = self.settings.dlq_topic, self.options.filters.since
        tps = [KafkaTopicPartition(topic, partition) for partition in range(partitions)]
        try:
            committed = self._committed(consumer, tps)
            starts = self._list_offsets(admin, tps, OffsetSpec.earliest())  # type: ignore[no-untyped-call]
            ends = self._list_offsets(admin, tps, OffsetSpec.latest())  # type: ignore[no-untyped-call]
            since_offsets = (
                self._list_offsets(admin, tps, OffsetSpec.for_timestamp(int(since.timestamp() * 1000)))
                if since is not None
                else {}
            )
        except KafkaException as exc:
            raise ReplayError(
                f"cannot read the offsets of {topic}: {exc.args[0].str()}", ReplayExit.UNREACHABLE
            ) from None
        ranges = {}
        for partition in range(partitions):
            end = ends[partition]
            start = max(starts[partition], committed.get(partition, OFFSET_INVALID))
            if since is not None:
                # -1: no dead letter at or after --since on this partition.
                start = max(start, since_offsets[partition] if since_offsets[partition] >= 0 else end)
            ranges[partition] = (min(start, end), end)
        return ranges

    @staticmethod
    def _list_offsets(admin: AdminClient, tps: list[KafkaTopicPartition], spec: OffsetSpec) -> dict[int, int]:
        futures = admin.list_offsets(
            {tp: spec for tp in tps}, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=METADATA_TIMEOUT
        )
        return {tp.partition: future.result().offset for tp, future in futures.items()}

    def _read(
        self,
        consumer: Consumer,
        sources: SourceReader,
        producer: Producer | None,
        input_partitions: int,
        ranges: dict[int, tuple[int, int]],
        progress: Progress,
    ) -> None:
        topic = self.settings.dlq_topic
        pending = {partition: end for partition, (start, end) in ranges.items() if start < end}
        if pending:
            consumer.assign([KafkaTopicPartition(topic, partition, ranges[partition][0]) for partition in pending])
        batch: list[Message] = []
        last_progress = time.monotonic()
        while pending or batch:
            messages = consumer.consume(BATCH_SIZE - len(batch), timeout=0.5) if pending else []
            for message in messages:
                partition, offset, error = message.partition(), message.offset(), message.error()
                assert partition is not None and offset is not None
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        if offset >= pending.get(partition, 0):
                            pending.pop(partition, None)
                    else:
                        logger.warning("reading %s[%d]: %s", topic, partition, error.str())
                    continue
                if partition not in pending or offset >= pending[partition]:
                    continue  # written after the run began: the next run's
                batch.append(message)
                if offset + 1 >= pending[partition]:
                    del pending[partition]
            if messages:
                last_progress = time.monotonic()
            elif pending and time.monotonic() - last_progress > STALL_TIMEOUT:
                raise ReplayError(
                    f"no record from {topic} for {STALL_TIMEOUT:.0f} s with partitions {sorted(pending)} not read "
                    "to their end; progress is kept up to the last acknowledged batch",
                    ReplayExit.UNREACHABLE,
                )
            if batch and (len(batch) >= BATCH_SIZE or not pending):
                self._settle(batch, consumer, sources, producer, input_partitions, progress)
                batch = []

    def _settle(
        self,
        batch: list[Message],
        consumer: Consumer,
        sources: SourceReader,
        producer: Producer | None,
        input_partitions: int,
        progress: Progress,
    ) -> None:
        """One batch: decide each dead letter, send, wait for the acknowledgements, commit, report."""
        options, settings = self.options, self.settings
        matching: list[DeadLetter] = []
        for message in batch:
            dead_letter = read_dead_letter(message)
            if isinstance(dead_letter, str):
                progress.counts["unreadable"] += 1
                logger.warning(
                    "skipping %s[%s]@%s: %s", message.topic(), message.partition(), message.offset(), dead_letter
                )
            elif options.filters.matches(dead_letter):
                matching.append(dead_letter)
        read_back = sources.fetch([dead_letter.source for dead_letter in matching if dead_letter.needs_source])
        replays = [
            decide(
                dead_letter,
                read_back.get(dead_letter.source),
                options.max_replays,
                settings.input_topic,
                input_partitions,
            )
            for dead_letter in matching
        ]
        failures = self._send(producer, [replay for replay in replays if replay.action == "send"])
        if producer is not None:
            self._commit(consumer, batch, failures)
        for replay in replays:
            failure = failures.get(replay.dead_letter.ref)
            self._report(replay, failure)
            if failure is None:
                progress.counts[replay.action] += 1
            progress.counts["matched"] += 1
        progress.read += len(batch)
        progress.show()
        if failures:
            first = min(failures.items(), key=lambda item: item[0].offset)
            raise ReplayError(
                f"{len(failures)} record(s) could not be sent, the first for {first[0]}: {first[1]}; progress is "
                "committed up to the dead letter before it",
                ReplayExit.SEND_FAILED,
            )

    def _send(self, producer: Producer | None, replays: list[Replay]) -> dict[RecordRef, str]:
        """Produce each replay and wait for its acknowledgement; what failed, by dead letter."""
        if producer is None or not replays:
            return {}
        topic = self.settings.input_topic
        outcome: dict[RecordRef, str | None] = {}

        def acknowledged(ref: RecordRef) -> Any:
            def on_delivery(error: KafkaError | None, _message: Message) -> None:
                outcome[ref] = None if error is None else error.str()

            return on_delivery

        for replay in replays:
            ref = replay.dead_letter.ref
            while True:
                try:
                    producer.produce(
                        topic,
                        value=replay.value,
                        key=replay.key,
                        headers=[(REPLAY_COUNT_HEADER, str(replay.count))],
                        partition=-1 if replay.partition is None else replay.partition,  # -1: by key
                        on_delivery=acknowledged(ref),
                    )
                    break
                except BufferError:
                    producer.poll(0.5)  # the local queue is full: let acknowledgements free it
                except KafkaException as exc:
                    outcome[ref] = exc.args[0].str()
                    break
            producer.poll(0)
        producer.flush()  # until each is acknowledged or message.timeout.ms runs out
        failures = {}
        for replay in replays:
            ref = replay.dead_letter.ref
            if ref not in outcome:
                failures[ref] = "not acknowledged"
            elif outcome[ref] is not None:
                failures[ref] = str(outcome[ref])
        return failures

    def _commit(self, consumer: Consumer, batch: list[Message], failures: dict[RecordRef, str]) -> None:
        """Commit past the batch, or on a partition with a failed send, up to the first one."""
        topic = self.settings.dlq_topic
        next_offsets: dict[int, int] = {}
        for message in batch:
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            next_offsets[partition] = max(next_offsets.get(partition, 0), offset + 1)
        for ref in failures:
            next_offsets[ref.partition] = min(next_offsets[ref.partition], ref.offset)
        offsets = [KafkaTopicPartition(topic, partition, offset) for partition, offset in sorted(next_offsets.items())]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            raise ReplayError(
                f"the batch was sent but its progress could not be committed ({exc.args[0].str()}): a second run "
                "sends it again",
                ReplayExit.UNREACHABLE,
            ) from None

    def _report(self, replay: Replay, failure: str | None) -> None:
        dead_letter, headers = replay.dead_letter, replay.dead_letter.headers
        action: str = replay.action
        if replay.action == "send":
            action = "would_send" if self.options.dry_run else ("failed" if failure else "sent")
        line: dict[str, Any] = {
            "dead_letter": str(dead_letter.ref),
            "event_id": headers.event_id,
            "stage": headers.error_stage,
            "error_class": headers.error_class,
            "reason": headers.error_reason,
            "action": action,
            "replay_count": replay.count,
        }
        if replay.action == "send":
            partition = "" if replay.partition is None else f"[{replay.partition}]"
            line["to"] = f"{self.settings.input_topic}{partition}"
        note = failure or replay.note
        if note:
            line["note"] = note
        self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.out.flush()


# -- the command line -------------------------------------------------------------------------------
