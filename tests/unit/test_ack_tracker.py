import random

import pytest

from libs.kafka.acks import PartitionAckTracker


def test_commit_offset_waits_for_the_lowest_unfinished_message():
    tracker = PartitionAckTracker(start_offset=10)
    for offset in (10, 11, 12):
        tracker.track(offset)
    assert tracker.commit_offset() == 10
    tracker.ack(12)
    tracker.ack(10)
    assert tracker.commit_offset() == 11
    tracker.ack(11)
    assert tracker.commit_offset() == 13


def test_commit_offset_of_an_idle_partition_is_its_start():
    assert PartitionAckTracker(start_offset=7).commit_offset() == 7


def test_gaps_in_offsets_are_allowed_as_compacted_or_transactional_topics_have_them():
    tracker = PartitionAckTracker(start_offset=0)
    tracker.track(0)
    tracker.track(5)
    tracker.ack(0)
    assert tracker.commit_offset() == 5
    tracker.ack(5)
    assert tracker.commit_offset() == 6


def test_acking_twice_or_an_untracked_offset_is_refused():
    tracker = PartitionAckTracker(start_offset=0)
    tracker.track(0)
    tracker.ack(0)
    with pytest.raises(ValueError):
        tracker.ack(0)
    with pytest.raises(ValueError):
        tracker.ack(3)


def test_offsets_must_be_tracked_in_increasing_order():
    tracker = PartitionAckTracker(start_offset=0)
    tracker.track(4)
    with pytest.raises(ValueError):
        tracker.track(2)


@pytest.mark.parametrize("seed", range(20))
def test_any_ack_order_never_commits_past_an_unacked_offset(seed):
    rng = random.Random(seed)
    tracker = PartitionAckTracker(start_offset=100)
    offsets = list(range(100, 160))
    for offset in offsets:
        tracker.track(offset)
    rng.shuffle(offsets)
    acked: set[int] = set()
    for offset in offsets:
        tracker.ack(offset)
        acked.add(offset)
        committed = tracker.commit_offset()
        assert all(o in acked for o in range(100, committed))
        assert committed == 160 or committed not in acked
    assert tracker.commit_offset() == 160
    assert tracker.outstanding_count == 0
