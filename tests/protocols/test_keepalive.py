"""
Tests for :mod:`broadcaster.protocols.keepalive`: one timer pinging every connection,
with the time driven by :class:`twisted.internet.task.Clock`.
"""

from typing import List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.protocols.keepalive import Keepalive


class FakeConnection:
    """Records pings and timeouts; ``open`` says whether it takes pings."""

    def __init__(self, log: List, name: str) -> None:
        self.log = log
        self.name = name
        self.open = True

    def keepalive_ping(self) -> bool:
        if self.open:
            self.log.append(("ping", self.name))
        return self.open

    def keepalive_timed_out(self) -> None:
        self.log.append(("dead", self.name))


class KeepaliveTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.log = []
        self.keepalive = Keepalive(self.clock, interval=25, timeout=10)

    def connection(self, name: str) -> FakeConnection:
        connection = FakeConnection(self.log, name)
        self.keepalive.add(connection)
        return connection

    def test_ping_after_interval_then_after_each_pong(self):
        """A connection is pinged an interval after it is added, and an
        interval after each pong."""
        ann = self.connection("ann")
        self.clock.advance(24)
        self.assertEqual(self.log, [])
        self.clock.advance(1)
        self.assertEqual(self.log, [("ping", "ann")])
        self.keepalive.pong(ann)
        self.clock.advance(24)
        self.assertEqual(self.log, [("ping", "ann")])
        self.clock.advance(1)
        self.assertEqual(self.log, [("ping", "ann"), ("ping", "ann")])

    def test_a_quiet_spell_does_not_count_against_the_next_client(self):
        """After everyone left and the timer stopped, a quiet minute later a
        new client gets its full interval and timeout: the idle time is not
        counted as ticks it missed."""
        first = self.connection("first")
        self.clock.advance(3)
        self.keepalive.remove(first)
        self.clock.advance(60)
        self.connection("next")
        self.clock.advance(1)
        self.assertEqual(self.log, [])
        self.clock.advance(23)
        self.assertEqual(self.log, [])
        self.clock.advance(1)
        self.assertEqual(self.log, [("ping", "next")])

    def test_no_pong_within_timeout_is_reported(self):
        """A connection that does not answer within the timeout is reported
        dead once, and not pinged again."""
        self.connection("ann")
        self.clock.advance(25)
        self.clock.advance(9)
        self.assertEqual(self.log, [("ping", "ann")])
        self.clock.advance(1)
        self.assertEqual(self.log, [("ping", "ann"), ("dead", "ann")])
        self.clock.advance(100)
        self.assertEqual(self.log, [("ping", "ann"), ("dead", "ann")])

    def test_unsolicited_pong_changes_nothing(self):
        """A pong while no ping is outstanding does not delay the next ping."""
        ann = self.connection("ann")
        self.clock.advance(20)
        self.keepalive.pong(ann)
        self.clock.advance(5)
        self.assertEqual(self.log, [("ping", "ann")])

    def test_connections_share_one_timer(self):
        """However many connections there are, one call is scheduled, and
        none once the last is removed."""
        connections = [self.connection(str(i)) for i in range(100)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for connection in connections:
            self.keepalive.remove(connection)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.keepalive), 0)

    def test_removed_connection_is_not_pinged(self):
        """A removed connection gets no ping; the others still do."""
        ann = self.connection("ann")
        self.connection("bob")
        self.keepalive.remove(ann)
        self.clock.advance(25)
        self.assertEqual(self.log, [("ping", "bob")])

    def test_closing_connection_is_dropped_from_the_wheel(self):
        """A connection that declines a ping (it is closing) is not pinged
        again, nor reported dead."""
        ann = self.connection("ann")
        ann.open = False
        self.clock.advance(200)
        self.assertEqual(self.log, [])
        self.assertEqual(len(self.keepalive), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dead_peer_removing_another_due_at_the_same_tick(self):
        """Dropping one connection may remove another filed under the same
        tick; that one is then neither pinged nor reported."""
        ann = self.connection("ann")
        bob = self.connection("bob")
        self.clock.advance(25)
        self.log.clear()

        def drop_both(name):
            def timed_out():
                self.log.append(("dead", name))
                self.keepalive.remove(ann)
                self.keepalive.remove(bob)

            return timed_out

        ann.keepalive_timed_out = drop_both("ann")
        bob.keepalive_timed_out = drop_both("bob")
        self.clock.advance(10)
        self.assertEqual(len(self.log), 1)
        self.assertEqual(len(self.keepalive), 0)

    def test_one_failing_connection_spares_the_others(self):
        """A connection whose ping raises is logged; the others are pinged."""
        bad = self.connection("bad")

        def explode():
            raise OSError("connection reset")

        bad.keepalive_ping = explode
        self.connection("bob")
        self.clock.advance(25)
        self.assertEqual(self.log, [("ping", "bob")])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_late_timer_catches_up(self):
        """When the reactor was too busy to call on time, every tick missed
        is handled at once: the ping, then the timeout."""
        self.connection("ann")
        self.clock.advance(60)
        self.assertEqual(self.log, [("ping", "ann"), ("dead", "ann")])

    def test_resolution_follows_short_intervals(self):
        """With intervals shorter than the default tick, the timer ticks as
        often as the shortest of them."""
        keepalive = Keepalive(self.clock, interval=0.5, timeout=0.25)
        connection = FakeConnection(self.log, "ann")
        keepalive.add(connection)
        self.clock.advance(0.5)
        self.assertEqual(self.log, [("ping", "ann")])
        self.clock.advance(0.25)
        self.assertEqual(self.log, [("ping", "ann"), ("dead", "ann")])
