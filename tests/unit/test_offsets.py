"""Offsets are committed only below work that is fully published, whatever order it finishes in."""

from consumer.offsets import OffsetTracker

TP = ("events", 0)
OTHER = ("events", 1)


def tracker_with(offsets: list[int], tp=TP) -> tuple[OffsetTracker, int]:
    tracker = OffsetTracker()
    epoch = tracker.assign(tp)
    for offset in offsets:
        assert tracker.add(tp, offset) == epoch
    return tracker, epoch


def test_out_of_order_completion_never_commits_past_unfinished_work():
    tracker = OffsetTracker()
    epoch = tracker.add(TP, 10)
    for offset in (11, 12, 13):
        tracker.add(TP, offset)
    tracker.done(TP, 12, epoch)
    tracker.done(TP, 13, epoch)
    assert tracker.commit_points() == {TP: 10}  # 10 and 11 still in flight
    tracker.done(TP, 10, epoch)
    assert tracker.commit_points() == {TP: 11}
    tracker.done(TP, 11, epoch)
    assert tracker.commit_points() == {TP: 14}
    tracker.mark_committed({TP: 14})
    assert tracker.commit_points() == {}


def test_late_acknowledgement_for_a_revoked_partition_is_ignored():
    tracker = OffsetTracker()
    old_epoch = tracker.add(TP, 5)
    tracker.revoke(TP)
    tracker.assign(TP)
    tracker.add(TP, 7)
    assert tracker.done(TP, 5, old_epoch) is False
    assert tracker.commit_points() == {TP: 7}
    assert tracker.in_flight() == 1


def test_a_point_sent_is_not_sent_again_unless_the_commit_is_refused():
    tracker, epoch = tracker_with([0, 1])
    tracker.done(TP, 0, epoch)
    tracker.mark_sent(tracker.commit_points())
    assert tracker.commit_points() == {}
    tracker.commit_failed([TP])
    assert tracker.commit_points() == {TP: 1}


def test_a_waited_commit_sends_every_point_the_broker_has_not_acknowledged():
    tracker, epoch = tracker_with([0, 1])
    tracker.done(TP, 0, epoch)
    tracker.mark_sent({TP: 1})
    assert tracker.commit_points(unacknowledged=True) == {TP: 1}  # sent, but the answer may be a refusal
    tracker.mark_committed({TP: 1})
    assert tracker.commit_points(unacknowledged=True) == {}
    tracker.commit_failed([TP])  # a late refusal of an older commit
    assert tracker.commit_points() == {} and tracker.commit_points(unacknowledged=True) == {}


def test_partitions_commit_independently():
    tracker, epoch = tracker_with([5, 6])
    other_epoch = tracker.assign(OTHER)
    tracker.add(OTHER, 100)
    tracker.done(OTHER, 100, other_epoch)
    assert tracker.commit_points() == {TP: 5, OTHER: 101}
    assert tracker.commit_points([OTHER]) == {OTHER: 101}


def test_a_held_partition_refuses_records_and_commits_nothing_until_reassigned():
    tracker, epoch = tracker_with([7, 8, 9])
    tracker.done(TP, 7, epoch)
    assert tracker.hold(TP) == 7  # where consuming started: the rewind target if nothing was committed
    assert tracker.add(TP, 10) is None  # fetched past the aborted batch: must not be processed
    assert not tracker.done(TP, 8, epoch)
    assert tracker.commit_points() == {} and tracker.in_flight() == 0
    new_epoch = tracker.assign(TP)
    assert tracker.add(TP, 7) == new_epoch


def test_the_in_flight_totals_follow_every_change():
    """What the window reads for every record: counted as offsets come and go, not summed each time."""
    tracker = OffsetTracker()
    epoch = tracker.assign(TP)
    other = tracker.assign(OTHER)
    tracker.add(TP, 0, 100)
    tracker.add(TP, 1, 50)
    tracker.add(TP, 1, 50)  # read again before it was done: counted once
    tracker.add(OTHER, 7, 10)
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (3, 160)
    tracker.done(TP, 0, epoch)
    tracker.done(TP, 0, epoch)  # a second acknowledgement of the same offset changes nothing
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (2, 60)
    tracker.hold(OTHER)  # rewinding: its work is dropped
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (1, 50)
    tracker.assign(TP)  # a new epoch: the old one's work is dropped
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (0, 0)
    tracker.add(TP, 2, 5)
    tracker.revoke(TP)
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (0, 0)
    assert other != epoch
