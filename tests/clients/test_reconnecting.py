"""
Tests for what the reconnecting clients share: :mod:`broadcaster.clients.backoff`
and :mod:`broadcaster.clients.recovery`.
"""

from twisted.trial.unittest import SynchronousTestCase

from broadcaster.clients.backoff import Backoff
from broadcaster.clients.recovery import Positions


class BackoffTests(SynchronousTestCase):
    def test_the_bound_doubles_up_to_the_maximum(self):
        backoff = Backoff(initial=0.5, maximum=4.0, random=lambda: 0.999999)
        waits = [round(backoff.next(), 3) for _ in range(6)]
        self.assertEqual(waits, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0])

    def test_full_jitter_draws_from_zero(self):
        backoff = Backoff(initial=1.0, maximum=8.0, random=lambda: 0.0)
        self.assertEqual([backoff.next() for _ in range(4)], [0.0] * 4)
        half = Backoff(initial=1.0, maximum=8.0, random=lambda: 0.5)
        self.assertEqual([half.next() for _ in range(5)], [0.5, 1.0, 2.0, 4.0, 4.0])

    def test_reset_starts_again(self):
        backoff = Backoff(initial=1.0, maximum=8.0, random=lambda: 0.5)
        for _ in range(10):
            backoff.next()
        backoff.reset()
        self.assertEqual(backoff.next(), 0.5)

    def test_many_attempts_do_not_overflow(self):
        backoff = Backoff(random=lambda: 0.5)
        for _ in range(5000):
            backoff.next()
        self.assertEqual(backoff.next(), 15.0)

    def test_bad_bounds_are_refused(self):
        self.assertRaises(ValueError, Backoff, initial=0)
        self.assertRaises(ValueError, Backoff, initial=10, maximum=1)


class PositionsTests(SynchronousTestCase):
    def test_a_first_connection_starts_where_the_rooms_stand(self):
        positions = Positions(["dev"])
        self.assertEqual(positions.rooms(), ["lobby", "dev"])
        self.assertEqual(positions.url("ws://h:1/?name=ann"), "ws://h:1/?name=ann")
        self.assertEqual(positions.joins(), [{"type": "join", "room": "dev"}])
        positions.started("lobby", "e1", 4)
        positions.started("dev", "e2", 0)
        self.assertEqual(positions.url("ws://h:1/?name=ann&since=x:1"), "ws://h:1/?name=ann&since=e1%3A4")
        self.assertEqual(
            positions.joins(), [{"type": "join", "room": "dev", "since": {"epoch": "e2", "seq": 0}}]
        )

    def test_messages_move_it_and_duplicates_are_dropped(self):
        positions = Positions()
        positions.started("lobby", "e1", 4)
        self.assertTrue(positions.saw({"type": "message", "room": "lobby", "epoch": "e1", "seq": 5}))
        self.assertFalse(positions.saw({"type": "message", "room": "lobby", "epoch": "e1", "seq": 5}))
        # Not seen before: a replayed message that came after a newer live one.
        self.assertTrue(positions.saw({"type": "message", "room": "lobby", "epoch": "e1", "seq": 3}))
        self.assertFalse(positions.saw({"type": "message", "room": "lobby", "epoch": "e1", "seq": 3}))
        self.assertEqual(positions.position("lobby"), ("e1", 5))
        # A new epoch (the server restarted): a new sequence.
        self.assertTrue(positions.saw({"type": "message", "room": "lobby", "epoch": "e9", "seq": 1}))
        self.assertEqual(positions.position("lobby"), ("e9", 1))
        # Rooms it is not in, and malformed events, are let through untouched.
        self.assertTrue(positions.saw({"type": "message", "room": "other", "epoch": "e", "seq": 1}))
        self.assertTrue(positions.saw({"type": "message", "room": "lobby", "seq": "1"}))
        self.assertEqual(positions.position("lobby"), ("e9", 1))

    def test_a_later_start_does_not_move_a_known_position(self):
        positions = Positions()
        positions.started("lobby", "e1", 4)
        positions.started("lobby", "e2", 0)
        positions.started("lobby", "e3", True)
        self.assertEqual(positions.position("lobby"), ("e1", 4))

    def test_want_and_drop(self):
        positions = Positions()
        positions.want("dev")
        positions.want("dev")
        positions.drop("lobby")
        self.assertEqual(positions.rooms(), ["lobby", "dev"])
        positions.drop("dev")
        self.assertEqual(positions.rooms(), ["lobby"])

    def test_a_restart_moves_a_quiet_room_to_the_new_epoch(self):
        """After a replay from a lost epoch in which nothing new was seen,
        the position is where the room stood when the replay began, so the
        next recovery does not report the same loss again."""
        positions = Positions(["dev"])
        positions.started("dev", "old", 7)
        positions.recovered("dev", "new", 0)
        self.assertEqual(positions.position("dev"), ("new", 0))
        # A replayed or live message of the new epoch already moved it: kept.
        self.assertTrue(positions.saw({"type": "message", "room": "dev", "epoch": "new", "seq": 3}))
        positions.recovered("dev", "new", 2)
        self.assertEqual(positions.position("dev"), ("new", 3))
        # Rooms with nothing seen, rooms not wanted, malformed positions: untouched.
        positions.recovered("lobby", "new", 0)
        positions.recovered("other", "new", 0)
        positions.recovered("dev", "newer", "1")
        self.assertEqual(
            (positions.position("lobby"), positions.position("other"), positions.position("dev")),
            (None, None, ("new", 3)),
        )


class InterleavedReplayTests(SynchronousTestCase):
    def test_live_messages_overtaking_a_replay_lose_nothing(self):
        """With several nodes, live messages may arrive before the replayed
        older ones: every one is taken once, and the position is the newest."""
        positions = Positions()
        positions.started("lobby", "e1", 10)
        arrivals = [14, 15, 11, 12, 13, 15, 12, 16]
        taken = [
            seq for seq in arrivals
            if positions.saw({"type": "message", "room": "lobby", "epoch": "e1", "seq": seq})
        ]
        self.assertEqual(taken, [14, 15, 11, 12, 13, 16])
        self.assertEqual(positions.position("lobby"), ("e1", 16))

    def test_memory_is_bounded(self):
        from broadcaster.clients.recovery import SEEN

        positions = Positions()
        for seq in range(1, 3 * SEEN):
            positions.saw({"type": "message", "room": "lobby", "epoch": "e1", "seq": seq})
        self.assertLessEqual(len(positions._seen["lobby"][2]), SEEN)
        # Long past: still a repeat.
        self.assertFalse(positions.saw({"type": "message", "room": "lobby", "epoch": "e1", "seq": 5}))
