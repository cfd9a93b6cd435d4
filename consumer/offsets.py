"""Which input offsets may be committed: per partition, the highest offset below which every event
has been published (result or dead letter) and acknowledged by the broker.

Events finish out of order (a batch, a retried fetch, a dead letter published early), so the commit
point is the lowest offset still in flight; with nothing in flight it is one past the last offset
seen. A revoked partition is forgotten, and late acknowledgements for it are ignored.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _PartitionState:
    epoch: int
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None


class OffsetTracker:
    """Thread-safe: the poll loop adds offsets, delivery callbacks complete them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, _PartitionState] = {}
        self._epoch = 0

    def assign(self, tp: TopicPartitionKey) -> None:
        with self._lock:
            self._epoch += 1
            self._partitions[tp] = _PartitionState(epoch=self._epoch)

    def revoke(self, tp: TopicPartitionKey) -> None:
        with self._lock:
            self._partitions.pop(tp, None)

    def epoch(self, tp: TopicPartitionKey) -> int | None:
        with self._lock:
            state = self._partitions.get(tp)
            return state.epoch if state else None

    def is_current(self, tp: TopicPartitionKey, epoch: int) -> bool:
        with self._lock:
            state = self._partitions.get(tp)
            return state is not None and state.epoch == epoch

    def add(self, tp: TopicPartitionKey, offset: int) -> int:
        """Record a polled offset as in flight; returns the partition's epoch (assigning if needed)."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None:
                self._epoch += 1
                state = self._partitions[tp] = _PartitionState(epoch=self._epoch)
            state.pending.add(offset)
            state.next_offset = max(state.next_offset or 0, offset + 1)
            return state.epoch

    def done(self, tp: TopicPartitionKey, offset: int, epoch: int) -> bool:
        """Mark an offset published and acknowledged; False if its partition was revoked since."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None or state.epoch != epoch:
                return False
            state.pending.discard(offset)
            return True

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(state.pending) for state in self._partitions.values())

    def in_flight_for(self, tps: list[TopicPartitionKey]) -> int:
        with self._lock:
            return sum(len(self._partitions[tp].pending) for tp in tps if tp in self._partitions)

    def commit_points(self, tps: list[TopicPartitionKey] | None = None) -> dict[TopicPartitionKey, int]:
        """Offsets to commit (Kafka's 'next offset to read') that moved since the last commit."""
        points = {}
        with self._lock:
            for tp, state in self._partitions.items():
                if tps is not None and tp not in tps:
                    continue
                if state.next_offset is None:
                    continue
                point = min(state.pending) if state.pending else state.next_offset
                if state.committed is None or point > state.committed:
                    points[tp] = point
        return points

    def mark_committed(self, points: dict[TopicPartitionKey, int]) -> None:
        with self._lock:
            for tp, point in points.items():
                state = self._partitions.get(tp)
                if state is not None:
                    state.committed = max(state.committed or 0, point)
