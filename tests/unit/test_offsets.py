"""Offsets are committed only below work that is fully published, whatever order it finishes in."""

from consumer.offsets import OffsetTracker

TP = ("events", 0)


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
