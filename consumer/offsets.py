"""Which input offsets may be committed: per partition, the highest offset below which every event
has been published (result or dead letter) and acknowledged by the broker.

Events finish out of order (a batch, a retried fetch, a dead letter published early), so the commit
point is the lowest offset still in flight; with nothing in flight it is one past the last offset
seen. Every assignment of a partition gets a new epoch: work and acknowledgements that carry an older
epoch belong to a revoked (or rewound) assignment and are ignored, so they can never move a commit
point of the partition's current owner.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _PartitionState:
    epoch: int
    pending: dict[int, int] = field(default_factory=dict)
    """Offsets in flight, with the bytes each record holds."""
    next_offset: int | None = None  # one past the highest offset seen
    first_offset: int | None = None  # the lowest offset seen in this epoch: where consuming started
    committed: int | None = None
    """The last point the broker acknowledged committing."""
    sent: int | None = None
    """The last point sent in an asynchronous commit the broker has not answered yet."""
    held: bool = False  # being rewound: new records are refused until `assign` starts a new epoch


class OffsetTracker:
    """Thread-safe: the poll loop adds offsets, the inference thread and delivery callbacks complete them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, _PartitionState] = {}
        self._epoch = 0
        # Totals over every partition's pending offsets, kept as they change: read for every record.
        self._in_flight = 0
        self._in_flight_bytes = 0

    def _drop(self, state: _PartitionState | None) -> None:
        """Take `state`'s pending offsets out of the totals (its partition is forgotten or renewed)."""
        if state is not None:
            self._in_flight -= len(state.pending)
            self._in_flight_bytes -= sum(state.pending.values())

    def _new_state(self, held: bool = False) -> _PartitionState:
        self._epoch += 1
        return _PartitionState(epoch=self._epoch, held=held)

    def assign(self, tp: TopicPartitionKey) -> int:
        """Start a new epoch for `tp` with nothing in flight; returns the epoch."""
        with self._lock:
            self._drop(self._partitions.get(tp))
            state = self._partitions[tp] = self._new_state()
            return state.epoch

    def revoke(self, tp: TopicPartitionKey) -> None:
        """Forget `tp`: its in-flight work is dropped and its late acknowledgements are ignored."""
        with self._lock:
            self._drop(self._partitions.pop(tp, None))

    def hold(self, tp: TopicPartitionKey) -> int | None:
        """Drop `tp`'s in-flight work and refuse its records until `assign`; returns where consuming
        started in the dropped epoch (the place to rewind to when nothing was committed), if known."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None:
                return None
            self._drop(state)
            self._partitions[tp] = self._new_state(held=True)
            return state.first_offset

    def epoch_of(self, tp: TopicPartitionKey) -> int | None:
        """`tp`'s current epoch, None when it is not tracked: work stamped with another epoch is stale."""
        with self._lock:
            state = self._partitions.get(tp)
            return state.epoch if state is not None else None

    def assigned(self) -> list[TopicPartitionKey]:
        with self._lock:
            return list(self._partitions)

    def is_current(self, tp: TopicPartitionKey, epoch: int) -> bool:
        with self._lock:
            state = self._partitions.get(tp)
            return state is not None and state.epoch == epoch

    def add(self, tp: TopicPartitionKey, offset: int, size: int = 0) -> int | None:
        """Record a polled offset (`size` bytes) as in flight; returns its epoch, or None if `tp` is held
        (drop it)."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None:
                state = self._partitions[tp] = self._new_state()
            if state.held:
                return None
            if offset in state.pending:  # polled again: counted once
                self._in_flight -= 1
                self._in_flight_bytes -= state.pending[offset]
            state.pending[offset] = size
            self._in_flight += 1
            self._in_flight_bytes += size
            state.next_offset = max(state.next_offset or 0, offset + 1)
            state.first_offset = offset if state.first_offset is None else min(state.first_offset, offset)
            return state.epoch

    def done(self, tp: TopicPartitionKey, offset: int, epoch: int) -> bool:
        """Mark an offset published and acknowledged; False if its partition was revoked since."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None or state.epoch != epoch:
                return False
            size = state.pending.pop(offset, None)
            if size is not None:
                self._in_flight -= 1
                self._in_flight_bytes -= size
            return True

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def in_flight_bytes(self) -> int:
        with self._lock:
            return self._in_flight_bytes

    def in_flight_for(self, tps: list[TopicPartitionKey]) -> int:
        with self._lock:
            return sum(len(self._partitions[tp].pending) for tp in tps if tp in self._partitions)

    def commit_points(
        self, tps: list[TopicPartitionKey] | None = None, unacknowledged: bool = False
    ) -> dict[TopicPartitionKey, int]:
        """Offsets to commit (Kafka's 'next offset to read') that moved since the last commit sent, or,
        with `unacknowledged`, since the last one the broker acknowledged: a commit still unanswered may
        yet be refused (one queued behind a rebalance carries a stale generation), so the last, waited
        commit before a partition goes sends its point again."""
        points = {}
        with self._lock:
            for tp, state in self._partitions.items():
                if tps is not None and tp not in tps:
                    continue
                if state.next_offset is None or state.held:
                    continue
                point = min(state.pending) if state.pending else state.next_offset
                since = state.committed
                if not unacknowledged and state.sent is not None:
                    since = max(since or 0, state.sent)
                if since is None or point > since:
                    points[tp] = point
        return points

    def mark_sent(self, points: dict[TopicPartitionKey, int]) -> None:
        """An asynchronous commit of `points` was sent: not due again unless it is refused."""
        with self._lock:
            for tp, point in points.items():
                state = self._partitions.get(tp)
                if state is not None:
                    state.sent = max(state.sent or 0, point)

    def mark_committed(self, points: dict[TopicPartitionKey, int]) -> None:
        """The broker acknowledged committing `points`."""
        with self._lock:
            for tp, point in points.items():
                state = self._partitions.get(tp)
                if state is not None:
                    state.committed = max(state.committed or 0, point)

    def commit_failed(self, tps: list[TopicPartitionKey]) -> None:
        """A commit of `tps` was refused: what was sent and not acknowledged is due again."""
        with self._lock:
            for tp in tps:
                state = self._partitions.get(tp)
                if state is not None:
                    state.sent = None
