"""The watchdog's verdict (mzoo.train.supervise.stalled) on heartbeats: which rank it blames."""

from mzoo.train.supervise import Beat, stalled

NOW = 1000.0


def test_nobody_blamed_while_every_rank_progresses():
    beats = {0: Beat(1, 5, NOW - 3, NOW), 1: Beat(2, 5, NOW - 4, NOW)}
    assert stalled(beats, [0, 1], NOW - 100, 10, NOW) is None


def test_a_frozen_rank_is_blamed_not_the_one_waiting_for_it():
    beats = {0: Beat(1, 5, NOW - 12, NOW - 0.5), 1: Beat(2, 5, NOW - 12, NOW - 11)}
    verdict = stalled(beats, [0, 1], NOW - 100, 10, NOW)
    assert verdict.startswith("rank 1 (last step 5) made no progress for 10 s and is not running"), verdict


def test_with_every_process_running_the_rank_behind_is_blamed():
    beats = {0: Beat(1, 7, NOW - 11, NOW), 1: Beat(2, 6, NOW - 30, NOW), 2: Beat(3, 7, NOW - 11, NOW)}
    verdict = stalled(beats, [0, 1, 2], NOW - 100, 10, NOW)
    assert verdict.startswith("rank 1 (last step 6) made no progress for 10 s while waiting"), verdict


def test_a_rank_that_never_started_gets_the_start_up_allowance():
    beats = {0: Beat(1, 0, NOW - 1, NOW)}
    assert stalled(beats, [0, 1], NOW - 200, 10, NOW) is None  # under 300 s since the start
    assert "rank 1 (no heartbeat)" in stalled(beats, [0, 1], NOW - 400, 10, NOW)
