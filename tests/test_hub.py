"""
Tests for :mod:`broadcaster.hub`: membership and fan-out, with plain Python
members and a fake clock.
"""

from typing import List

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.hub import BinaryMessage, Event, Hub, Joined, Left, TextMessage, encoded


class RecordingMember:
    """A member that remembers what it was given."""

    def __init__(self, member_id: str) -> None:
        self.id = member_id
        self.events: List[Event] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)


class BrokenMember(RecordingMember):
    """A member whose connection fails on every delivery."""

    def deliver(self, event: Event) -> None:
        raise ConnectionError("transport gone")


class HubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.hub = Hub(self.clock, node_id="n1")

    def join(self, member_id: str, cls=RecordingMember) -> RecordingMember:
        member = cls(member_id)
        self.hub.join(member)
        return member

    def test_ids_are_unique_and_carry_the_node(self) -> None:
        """Every id is new and starts with the node id."""
        ids = [self.hub.new_id() for _ in range(100)]
        self.assertEqual(len(set(ids)), 100)
        self.assertTrue(all(i.startswith("n1-") for i in ids))

    def test_random_node_ids_differ(self) -> None:
        """Two hubs without a configured node id hand out different ids."""
        self.assertNotEqual(Hub(self.clock).new_id(), Hub(self.clock).new_id())

    def test_join_is_announced_to_everyone_including_the_newcomer(self) -> None:
        """A join reaches the members already there and the newcomer itself."""
        ann = self.join("ann")
        bob = self.join("bob")
        self.assertEqual(ann.events, [Joined(1000, "ann"), Joined(1000, "bob")])
        self.assertEqual(bob.events, [Joined(1000, "bob")])

    def test_leave_is_announced_to_the_others(self) -> None:
        """A departure reaches the remaining members and stamps the time."""
        ann = self.join("ann")
        bob = self.join("bob")
        self.clock.advance(5)
        self.hub.leave(bob)
        self.assertEqual(ann.events[-1], Left(1005, "bob"))
        self.assertEqual(bob.events, [Joined(1000, "bob")])
        self.assertEqual(self.hub.member_ids(), ["ann"])

    def test_leave_twice_or_without_joining_is_silent(self) -> None:
        """A member that never joined, or already left, announces nothing."""
        ann = self.join("ann")
        stranger = RecordingMember("stranger")
        self.assertIsNone(self.hub.leave(stranger))
        bob = self.join("bob")
        self.hub.leave(bob)
        self.assertIsNone(self.hub.leave(bob))
        self.assertEqual([type(e) for e in ann.events], [Joined, Joined, Left])

    def test_join_twice_is_refused(self) -> None:
        """The same id cannot be in the hub twice."""
        self.join("ann")
        self.assertRaises(ValueError, self.hub.join, RecordingMember("ann"))

    def test_text_reaches_everyone_including_the_sender(self) -> None:
        """A text message is delivered, unchanged, to every member."""
        ann = self.join("ann")
        bob = self.join("bob")
        event = self.hub.publish_text("ann", "hello <b>")
        self.assertEqual(event, TextMessage(1000, "ann", "hello <b>"))
        self.assertIs(ann.events[-1], event)
        self.assertIs(bob.events[-1], event)

    def test_binary_reaches_everyone(self) -> None:
        """A binary message is delivered byte for byte to every member."""
        ann = self.join("ann")
        bob = self.join("bob")
        self.hub.publish_binary("bob", b"\x00\xff")
        self.assertEqual(ann.events[-1], BinaryMessage(1000, "bob", b"\x00\xff"))
        self.assertEqual(bob.events[-1], BinaryMessage(1000, "bob", b"\x00\xff"))

    def test_messages_arrive_in_the_order_sent(self) -> None:
        """Each member sees one sender's messages in the order published."""
        ann = self.join("ann")
        for i in range(50):
            self.hub.publish_text("ann", str(i))
        texts = [e.text for e in ann.events if isinstance(e, TextMessage)]
        self.assertEqual(texts, [str(i) for i in range(50)])

    def test_a_failing_member_does_not_stop_the_others(self) -> None:
        """A delivery that raises is logged and the rest still receive the event."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        ann = self.join("ann")
        self.join("broken", BrokenMember)
        bob = self.join("bob")
        self.hub.publish_text("ann", "still here")
        self.assertEqual(ann.events[-1].text, "still here")
        self.assertEqual(bob.events[-1].text, "still here")
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 3)
        failures = [e for e in logged if e["log_level"] == LogLevel.critical]
        self.assertEqual({e["client"] for e in failures}, {"broken"})

    def test_a_member_leaving_during_fan_out_does_not_break_it(self) -> None:
        """A member that leaves while an event is being delivered does not
        stop that event reaching the members after it, and its departure is
        announced after that event, to everyone in the same order."""
        hub = self.hub

        class Quitter(RecordingMember):
            def deliver(self, event: Event) -> None:
                super().deliver(event)
                if isinstance(event, TextMessage):
                    hub.leave(self)

        ann = self.join("ann")
        self.join("quitter", Quitter)
        bob = self.join("bob")
        hub.publish_text("ann", "bye")
        expected = [TextMessage(1000, "ann", "bye"), Left(1000, "quitter")]
        self.assertEqual(ann.events[-2:], expected)
        self.assertEqual(bob.events[-2:], expected)
        self.assertEqual(len(hub), 2)


class EncodedTests(SynchronousTestCase):
    def test_encodes_once_per_key(self) -> None:
        """The encoder runs once per wire format however many recipients ask."""
        calls = []

        def encode(event):
            calls.append(event)
            return b"x"

        event = TextMessage(0, "a", "t")
        for _ in range(10):
            self.assertEqual(encoded(event, "plain", encode), b"x")
        encoded(event, "json", encode)
        self.assertEqual(len(calls), 2)
