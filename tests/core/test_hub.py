"""
Tests for :mod:`broadcaster.core.hub`: connections, rooms and fan-out, with plain
Python members and a fake clock.
"""

import gc
import tracemalloc
from typing import List

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.events import (
    BinaryMessage,
    encoded,
    Event,
    ImageMessage,
    Joined,
    Left,
    Renamed,
    TextMessage,
)
from broadcaster.core.hub import Hub, NotInRoom, TooManyRooms
from broadcaster.core.members import MemberBase
from tests.support import clocked_hub


class RecordingMember(MemberBase):
    """A member that remembers what it was given."""

    def __init__(self, member_id: str, name=None) -> None:
        self.id = member_id
        self.name = name
        self.events: List[Event] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def texts(self):
        return [(e.room, e.text) for e in self.events if isinstance(e, TextMessage)]


class EncodingMember(RecordingMember):
    """A member that encodes what it is given, as a protocol does, and so
    fills the event's cache."""

    def __init__(self, member_id: str, name=None) -> None:
        super().__init__(member_id, name)
        self.encodings: List[bytes] = []

    def deliver(self, event: Event) -> None:
        super().deliver(event)
        self.encodings.append(
            encoded(event, EncodingMember, lambda e: b"framed " + getattr(e, "text", "").encode())
        )


class BrokenMember(RecordingMember):
    """A member whose connection fails on every delivery."""

    def deliver(self, event: Event) -> None:
        raise ConnectionError("transport gone")


class HubTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.hub = clocked_hub(self.clock, node_id="n1", history_size=5, max_rooms=3)

    def epoch(self, room: str) -> str:
        """The epoch of ``room``'s sequence now, as the backplane tells it."""
        return self.successResultOf(self.hub.position(room))[0]

    def turn(self) -> None:
        """The reactor turn ends: the fan-out delivers what it was given."""
        self.clock.advance(0)

    def connect(self, member_id: str, cls=RecordingMember, name=None) -> RecordingMember:
        # A connection arrives in a reactor turn of its own, after what was
        # published before it has gone out.
        self.turn()
        member = cls(member_id, name)
        self.hub.connect(member)
        return member


class ConnectionTests(HubTestCase):
    def test_ids_are_unique_and_carry_the_node(self) -> None:
        """Every id is new and starts with the node id."""
        ids = [self.hub.new_id() for _ in range(100)]
        self.assertEqual(len(set(ids)), 100)
        self.assertTrue(all(i.startswith("n1-") for i in ids))

    def test_random_node_ids_differ(self) -> None:
        """Two hubs without a configured node id hand out different ids."""
        self.assertNotEqual(Hub(self.clock).new_id(), Hub(self.clock).new_id())

    def test_connect_joins_the_lobby_and_is_announced_to_all(self) -> None:
        """A newcomer is put in the lobby; everyone there, the newcomer included, hears it."""
        ann = self.connect("ann", name="Ann")
        bob = self.connect("bob")
        self.turn()
        self.assertEqual(
            ann.events, [Joined(1000, "lobby", "ann", "Ann"), Joined(1000, "lobby", "bob")]
        )
        self.turn()
        self.assertEqual(bob.events, [Joined(1000, "lobby", "bob")])
        self.assertEqual(self.hub.rooms_of("ann"), ["lobby"])

    def test_disconnect_leaves_every_room(self) -> None:
        """A departure is announced in each room the member was in, to the others."""
        ann = self.connect("ann")
        bob = self.connect("bob")
        self.hub.join(bob, "dev")
        self.hub.join(ann, "dev")
        self.clock.advance(5)
        departures = self.hub.disconnect(bob)
        self.assertEqual(
            departures, [Left(1005, "lobby", "bob"), Left(1005, "dev", "bob")]
        )
        self.turn()
        self.assertEqual(ann.events[-2:], departures)
        self.assertEqual(self.hub.member_ids(), ["ann"])
        self.assertEqual(self.hub.rooms(), ["lobby", "dev"])

    def test_disconnect_twice_or_without_connecting_is_silent(self) -> None:
        """A member that never connected, or already left, announces nothing."""
        ann = self.connect("ann")
        self.assertEqual(self.hub.disconnect(RecordingMember("stranger")), [])
        bob = self.connect("bob")
        self.hub.disconnect(bob)
        self.assertEqual(self.hub.disconnect(bob), [])
        self.turn()
        self.assertEqual([type(e) for e in ann.events], [Joined, Joined, Left])

    def test_connect_twice_is_refused(self) -> None:
        """The same id cannot be connected twice."""
        self.connect("ann")
        self.assertRaises(ValueError, self.hub.connect, RecordingMember("ann"))

    def test_when_empty(self) -> None:
        """when_empty fires once the last member has gone."""
        ann = self.connect("ann")
        d = self.hub.when_empty()
        self.assertNoResult(d)
        self.hub.disconnect(ann)
        self.successResultOf(d)
        self.successResultOf(self.hub.when_empty())


class RoomTests(HubTestCase):
    def test_room_events_stay_in_the_room(self) -> None:
        """Joins, messages and leaves in a room reach only its members."""
        ann = self.connect("ann")
        bob = self.connect("bob")
        carl = self.connect("carl")
        self.hub.join(ann, "dev")
        self.hub.join(bob, "dev")
        self.hub.publish_text("ann", "in dev", "dev")
        self.turn()
        self.hub.leave(bob, "dev")
        self.turn()
        self.assertEqual([e for e in carl.events if e.room == "dev"], [])
        self.turn()
        self.assertEqual(bob.texts(), [("dev", "in dev")])
        self.turn()
        self.assertEqual(ann.events[-1], Left(1000, "dev", "bob"))

    def test_joining_twice_and_leaving_elsewhere_are_no_ops(self) -> None:
        """Joining a room one is in, or leaving one one is not in, announces nothing."""
        ann = self.connect("ann")
        self.assertIsNotNone(self.hub.join(ann, "dev"))
        self.turn()
        count = len(ann.events)
        self.assertIsNone(self.hub.join(ann, "dev"))
        self.assertIsNone(self.hub.leave(ann, "ops"))
        self.turn()
        self.assertEqual(len(ann.events), count)

    def test_speaking_outside_ones_rooms_is_refused(self) -> None:
        """A member may only speak in, and read the history of, rooms it is in."""
        self.connect("ann")
        self.assertRaises(NotInRoom, self.hub.publish_text, "ann", "x", "dev")
        self.assertRaises(NotInRoom, self.hub.history, "ann", "dev", 10)
        self.assertRaises(NotInRoom, self.hub.publish_text, "ghost", "x")

    def test_rooms_per_member_are_limited(self) -> None:
        """A member cannot be in more rooms than allowed."""
        hub = clocked_hub(self.clock, max_rooms_per_member=2)
        ann = RecordingMember("ann")
        hub.connect(ann)
        hub.join(ann, "a")
        self.assertRaises(TooManyRooms, hub.join, ann, "b")

    def test_presence(self) -> None:
        """room_members lists a room's members in the order they joined."""
        ann = self.connect("ann")
        bob = self.connect("bob")
        self.hub.join(bob, "dev")
        self.hub.join(ann, "dev")
        self.assertEqual([m.id for m in self.hub.room_members("dev")], ["bob", "ann"])
        self.hub.leave(bob, "dev")
        self.assertEqual([m.id for m in self.hub.room_members("dev")], ["ann"])
        self.assertEqual(self.hub.room_members("nowhere"), [])

    def test_rename_is_told_to_each_room(self) -> None:
        """A new name is announced in every room the member is in."""
        ann = self.connect("ann")
        bob = self.connect("bob")
        self.hub.join(ann, "dev")
        self.turn()
        ann.name = "Ann"
        self.hub.rename(ann)
        self.turn()
        self.assertEqual(
            ann.events[-2:], [Renamed(1000, "lobby", "ann", "Ann"), Renamed(1000, "dev", "ann", "Ann")]
        )
        self.turn()
        self.assertEqual(bob.events[-1], Renamed(1000, "lobby", "ann", "Ann"))
        self.hub.publish_text("ann", "hi")
        self.turn()
        self.assertEqual(bob.events[-1].name, "Ann")


class MessageTests(HubTestCase):
    def test_text_reaches_everyone_including_the_sender(self) -> None:
        """A text message is delivered, unchanged, to every member of the room."""
        ann = self.connect("ann")
        bob = self.connect("bob")
        event = self.successResultOf(self.hub.publish_text("ann", "hello <b>"))
        self.assertEqual((event.room, event.sender, event.text), ("lobby", "ann", "hello <b>"))
        self.turn()
        self.assertIs(ann.events[-1], event)
        self.turn()
        self.assertIs(bob.events[-1], event)

    def test_messages_are_numbered_per_room(self) -> None:
        """Each room numbers its messages 1, 2, 3 ... in one epoch."""
        ann = self.connect("ann")
        self.hub.join(ann, "dev")
        seqs = [
            self.successResultOf(self.hub.publish_text("ann", str(i), room)).seq
            for i, room in enumerate(["lobby", "dev", "lobby", "lobby", "dev"])
        ]
        self.assertEqual(seqs, [1, 1, 2, 3, 2])
        self.turn()
        lobby = [e for e in ann.events if isinstance(e, TextMessage) and e.room == "lobby"]
        self.assertEqual({e.epoch for e in lobby}, {self.epoch("lobby")})
        self.assertNotEqual(self.epoch("lobby"), self.epoch("dev"))

    def test_binary_and_images_go_to_the_lobby(self) -> None:
        """Binary messages and images reach the lobby byte for byte."""
        ann = self.connect("ann")
        bob = self.connect("bob")
        self.hub.leave(bob, "lobby")
        self.hub.publish_binary("bob", b"\x00\xff")
        image = self.hub.publish_image("bob", b"png", 1, 2)
        self.turn()
        self.assertEqual(ann.events[-2], BinaryMessage(1000, "bob", b"\x00\xff"))
        self.turn()
        self.assertIsInstance(ann.events[-1], ImageMessage)
        self.assertNotEqual(image.image_id, self.hub.publish_image("bob", b"png", 1, 2).image_id)
        self.turn()
        self.assertFalse(any(isinstance(e, (BinaryMessage, ImageMessage)) for e in bob.events))

    def test_messages_arrive_in_the_order_sent(self) -> None:
        """Each member sees one sender's messages in the order published."""
        ann = self.connect("ann")
        for i in range(50):
            self.hub.publish_text("ann", str(i))
        self.turn()
        self.assertEqual([t for _, t in ann.texts()], [str(i) for i in range(50)])

    def test_a_failing_member_does_not_stop_the_others(self) -> None:
        """A delivery that raises is logged and the rest still receive the event."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        ann = self.connect("ann")
        self.connect("broken", BrokenMember)
        bob = self.connect("bob")
        self.hub.publish_text("ann", "still here")
        self.turn()
        self.assertEqual(ann.texts()[-1], ("lobby", "still here"))
        self.turn()
        self.assertEqual(bob.texts()[-1], ("lobby", "still here"))
        # Once per batch it was given: its own arrival, then bob's with the
        # message (the same reactor turn).
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 2)
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
                    hub.disconnect(self)

        ann = self.connect("ann")
        self.connect("quitter", Quitter)
        bob = self.connect("bob")
        message = self.successResultOf(hub.publish_text("ann", "bye"))
        expected = [message, Left(1000, "lobby", "quitter")]
        self.turn()
        self.assertEqual(ann.events[-2:], expected)
        self.turn()
        self.assertEqual(bob.events[-2:], expected)
        self.assertEqual(len(hub), 2)


class HistoryTests(HubTestCase):
    def test_history_keeps_the_last_messages(self) -> None:
        """A room remembers its last history-size messages, oldest first."""
        self.connect("ann")
        for i in range(8):
            self.hub.publish_text("ann", str(i))
        self.assertEqual([m.text for m in self.successResultOf(self.hub.history("ann", "lobby", 50))], list("34567"))
        self.assertEqual([m.text for m in self.successResultOf(self.hub.history("ann", "lobby", 2))], list("67"))

    def test_replay_delivers_what_was_missed(self) -> None:
        """A member asking for messages after a seq gets exactly those, in order."""
        self.connect("ann")
        for i in range(4):
            last = self.successResultOf(self.hub.publish_text("ann", str(i)))
        bob = self.connect("bob")
        complete = self.successResultOf(self.hub.replay(bob, "lobby", last.epoch, 2))
        self.assertTrue(complete)
        self.turn()
        self.assertEqual(bob.texts(), [("lobby", "2"), ("lobby", "3")])

    def test_replay_in_the_turn_of_a_room_s_first_messages(self) -> None:
        """A member that joins and asks for a replay in the same reactor
        turn as a room's first messages (still on their way) gets each of
        them once: live, not replayed as well."""
        self.connect("ann")
        self.hub.join(self.hub.member("ann"), "dev")
        self.turn()
        first = self.successResultOf(self.hub.publish_text("ann", "1", "dev"))
        self.hub.publish_text("ann", "2", "dev")
        # Connected in the same turn (self.connect would end it first).
        bob = RecordingMember("bob")
        self.hub.connect(bob)
        self.hub.join(bob, "dev")
        self.assertTrue(self.successResultOf(self.hub.replay(bob, "dev", first.epoch, 0)))
        self.turn()
        self.assertEqual(bob.texts(), [("dev", "1"), ("dev", "2")])

    def test_replay_beyond_history_is_incomplete(self) -> None:
        """When the gap is older than the history, what exists comes with complete=False."""
        self.connect("ann")
        for i in range(8):
            last = self.successResultOf(self.hub.publish_text("ann", str(i)))
        bob = self.connect("bob")
        self.assertFalse(self.successResultOf(self.hub.replay(bob, "lobby", last.epoch, 1)))
        self.turn()
        self.assertEqual([t for _, t in bob.texts()], list("34567"))

    def test_replay_with_another_epoch_is_incomplete(self) -> None:
        """A since from another run of the sequence (a restart) is never complete."""
        self.connect("ann")
        self.hub.publish_text("ann", "after restart")
        bob = self.connect("bob")
        self.assertFalse(self.successResultOf(self.hub.replay(bob, "lobby", "old-epoch", 3)))
        self.turn()
        self.assertEqual(bob.texts(), [("lobby", "after restart")])

    def test_kept_messages_hold_no_encodings(self) -> None:
        """What the fan-out and replays encode for their recipients is not
        kept in the history with the message."""
        ann = self.connect("ann", EncodingMember)
        first = self.successResultOf(self.hub.publish_text("ann", "hi"))
        # Encoded while its round is under way...
        self.hub.fanout.flush()
        self.assertEqual(ann.encodings[-1], b"framed hi")
        # ...and no longer once it is done.
        self.turn()
        bob = self.connect("bob", EncodingMember)
        self.assertTrue(self.successResultOf(self.hub.replay(bob, "lobby", first.epoch, 0)))
        self.assertEqual([e.text for e in bob.events if isinstance(e, TextMessage)], ["hi"])
        (kept,) = self.successResultOf(self.hub.backplane.history("lobby", 10))
        self.assertEqual((kept, kept.wire), (first, {}))

    def test_idle_empty_rooms_are_forgotten_beyond_max_rooms(self) -> None:
        """With more rooms than allowed, the least recently used empty one is
        forgotten and starts a new epoch; occupied rooms are kept."""
        ann = self.connect("ann")
        self.hub.publish_text("ann", "x")
        epochs = {}
        for room in ("a", "b"):
            self.hub.join(ann, room)
            self.hub.publish_text("ann", "x", room)
            epochs[room] = self.epoch(room)
            self.hub.leave(ann, room)
        self.hub.join(ann, "c")
        self.hub.publish_text("ann", "x", "c")
        self.assertEqual(sorted(self.hub.backplane.histories), ["b", "c", "lobby"])
        self.assertNotEqual(self.epoch("a"), epochs["a"])


class SilentMember(RecordingMember):
    """A member that keeps nothing of what it is given."""

    def deliver(self, event: Event) -> None:
        pass


class HistoryMemoryTests(HubTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.hub = clocked_hub(self.clock, node_id="n1", history_size=100, max_rooms=100,
                       history_memory=64 * 1024)
        self.memory = self.hub.backplane.memory

    def test_what_is_counted_is_what_is_kept(self) -> None:
        """A kept message is counted as about what it takes in memory,
        however long its text and whatever its characters."""
        for text in ("", "x" * 100, "x" * 2000, "é" * 2000, "x" * 60000 + "\U0001F600"):
            hub = clocked_hub(self.clock, node_id="n1")
            ann = SilentMember("ann")
            hub.connect(ann)
            for room in ("a", "b", "c"):
                hub.join(ann, room)
                # What a room costs once is not a message's to count.
                hub.publish_text("ann", "first", room)
            self.turn()
            gc.collect()
            counted = hub.backplane.memory.used
            tracemalloc.start()
            self.addCleanup(tracemalloc.stop)
            before = tracemalloc.get_traced_memory()[0]
            for i in range(60):
                for room in ("a", "b", "c"):
                    # A string of its own, as one read from a socket is.
                    hub.publish_text("ann", "{}{:03d}".format(text, i), room)
                self.turn()
            gc.collect()
            taken = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            counted = hub.backplane.memory.used - counted
            self.assertTrue(0.9 * taken < counted < 1.25 * taken, (len(text), counted, taken))

    def test_a_recovery_past_messages_evicted_for_memory_is_incomplete(self) -> None:
        """Once a room's old messages were evicted to stay within
        --history-memory, a member recovering from before them gets the
        rest with complete false; one recovering after them, complete true."""
        ann = self.connect("ann")
        self.hub.join(ann, "big")
        first = self.successResultOf(self.hub.publish_text("ann", "first", "big"))
        for i in range(10):
            last = self.successResultOf(self.hub.publish_text("ann", str(i) * 10000, "big"))
        self.assertGreater(self.memory.evicted, 0)
        self.assertLessEqual(self.memory.used, 64 * 1024)
        bob = self.connect("bob")
        self.hub.join(bob, "big")
        self.assertFalse(self.successResultOf(self.hub.replay(bob, "big", first.epoch, first.seq)))
        self.turn()
        replayed = [t for _, t in bob.texts()]
        self.assertEqual(replayed, [str(i) * 10000 for i in range(10)][-len(replayed):])
        carl = self.connect("carl")
        self.hub.join(carl, "big")
        self.assertTrue(self.successResultOf(self.hub.replay(carl, "big", last.epoch, last.seq - 1)))

    def test_a_quiet_room_keeps_its_history_through_a_flood_elsewhere(self) -> None:
        """A member flooding other rooms past --history-memory trims those
        rooms, and a quiet room's history stays whole."""
        ann, eve = self.connect("ann"), self.connect("eve", SilentMember)
        self.hub.join(ann, "quiet")
        said = [self.successResultOf(self.hub.publish_text("ann", t, "quiet")) for t in "abc"]
        for i in range(100):
            room = "flood{}".format(i % 10)
            self.hub.join(eve, room)
            self.hub.publish_text("eve", "x" * 5000, room)
            self.turn()
        self.assertGreater(self.memory.evicted, 50)
        bob = self.connect("bob")
        self.hub.join(bob, "quiet")
        self.assertTrue(self.successResultOf(self.hub.replay(bob, "quiet", said[0].epoch, 0)))
        self.turn()
        self.assertEqual(bob.texts(), [("quiet", t) for t in "abc"])


class EncodedTests(SynchronousTestCase):
    def test_encodes_once_per_key(self) -> None:
        """The encoder runs once per wire format however many recipients ask."""
        calls = []

        def encode(event):
            calls.append(event)
            return b"x"

        event = TextMessage(0, "lobby", "a", "t")
        for _ in range(10):
            self.assertEqual(encoded(event, "plain", encode), b"x")
        encoded(event, "json", encode)
        self.assertEqual(len(calls), 2)


class ObserverTests(HubTestCase):
    def test_observers_see_each_event_once(self):
        """An observer gets every fanned-out event once, whatever the number of recipients."""
        seen = []
        self.hub.add_observer(seen.append)
        ann = self.connect("ann")
        self.connect("bob")
        self.hub.publish_text("ann", "hi")
        self.hub.disconnect(ann)
        self.turn()
        self.assertEqual([type(e).__name__ for e in seen], ["Joined", "Joined", "TextMessage", "Left"])

    def test_a_failing_observer_is_logged_and_ignored(self):
        """An observer that raises does not stop delivery or other observers."""
        seen = []

        def broken(event):
            raise RuntimeError("boom")

        self.hub.add_observer(broken)
        self.hub.add_observer(seen.append)
        ann = self.connect("ann")
        self.turn()
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(ann.events), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class UserPresenceTests(HubTestCase):
    """A user with several connections is one member of a room."""

    def signed_in(self, member_id, user, name=None):
        member = RecordingMember(member_id, name)
        member.user = user
        self.turn()
        self.hub.connect(member)
        return member

    def announced(self, member, room="lobby"):
        return [
            (type(e).__name__, e.member, e.user, e.connections)
            for e in member.events
            if isinstance(e, (Joined, Left, Renamed)) and e.room == room
        ]

    def test_first_and_last_connection_are_announced(self):
        watcher = self.connect("w")
        tab1 = self.signed_in("t1", "u-ann", "Ann")
        tab2 = self.signed_in("t2", "u-ann", "Ann")
        [seat] = [s for s in self.hub.presence("lobby") if s.user == "u-ann"]
        self.assertEqual((seat.id, seat.name, seat.connections), ("user:u-ann", "Ann", 2))
        self.assertEqual(len(self.hub.presence("lobby")), 2)
        self.hub.disconnect(tab1)
        self.turn()
        self.assertEqual(self.hub.presence("lobby")[-1].connections, 1)
        self.hub.disconnect(tab2)
        self.turn()
        self.assertEqual(
            self.announced(watcher),
            [("Joined", "w", None, 1), ("Joined", "t1", "u-ann", 1), ("Left", "t2", "u-ann", 0)],
        )
        self.assertEqual([s.id for s in self.hub.presence("lobby")], ["w"])

    def test_observers_hear_of_every_connection(self):
        heard = []
        self.hub.add_observer(heard.append)
        tab1 = self.signed_in("t1", "u-ann")
        self.signed_in("t2", "u-ann")
        self.hub.disconnect(tab1)
        self.turn()
        self.assertEqual(
            [(type(e).__name__, e.member, e.connections, e.announced) for e in heard],
            [("Joined", "t1", 1, True), ("Joined", "t2", 2, False), ("Left", "t1", 1, False)],
        )

    def test_a_room_knows_the_user_by_its_latest_name(self):
        watcher = self.connect("w")
        tab1 = self.signed_in("t1", "u-ann", "Ann")
        self.signed_in("t2", "u-ann", "Ann")
        tab1.name = "Annie"
        self.hub.rename(tab1)
        tab1.name = "Annie"
        self.hub.rename(tab1)
        self.turn()
        renames = [e for e in self.announced(watcher) if e[0] == "Renamed"]
        self.assertEqual(renames, [("Renamed", "t1", "u-ann", 2)])
        self.assertEqual(self.hub.presence("lobby")[-1].name, "Annie")

    def test_a_name_changed_by_another_connection_is_told(self):
        """A second tab with another name changes the name the room lists
        the user by: the room is told (a rename), and again when it goes."""
        watcher = self.connect("w")
        self.signed_in("t1", "u-ann", "First")
        tab2 = self.signed_in("t2", "u-ann", "Second")
        self.hub.disconnect(tab2)
        self.turn()
        self.assertEqual(
            [(e.member, e.name) for e in watcher.events if isinstance(e, Renamed)],
            [("t2", "Second"), ("t1", "First")],
        )
        self.assertEqual(self.hub.presence("lobby")[-1].name, "First")

    def test_anonymous_connections_are_each_a_member(self):
        watcher = self.connect("w")
        self.connect("a1")
        self.connect("a2")
        self.turn()
        self.assertEqual([s.id for s in self.hub.presence("lobby")], ["w", "a1", "a2"])
        self.assertEqual(
            [e[1] for e in self.announced(watcher) if e[0] == "Joined"], ["w", "a1", "a2"]
        )


class PositionedTests(HubTestCase):
    """A networked backplane tells the hub where a room stands when it
    starts receiving it: members who joined before have missed what came
    up to there, and get it from a replay, but nothing after."""

    def test_members_who_joined_meanwhile_are_replayed_up_to_there(self):
        talker = self.connect("talker")
        self.hub.join(talker, "x")
        for text in ("one", "two", "three"):
            self.hub.publish_text("talker", text, "x")
        self.turn()
        epoch = self.epoch("x")
        self.hub.leave(talker, "x")
        self.hub.forget_position("x")
        late = self.connect("late")
        self.hub.join(late, "x")
        # The backplane's subscription is ready from seq 2: "three" is live.
        self.hub.positioned("x", epoch, 2)
        complete = self.successResultOf(self.hub.replay(late, "x", epoch, 0))
        self.assertTrue(complete)
        self.assertEqual(late.texts(), [("x", "one"), ("x", "two")])

    def test_a_room_still_occupied_keeps_its_position(self):
        member = self.connect("m")
        self.hub.join(member, "x")
        self.hub.publish_text("m", "one", "x")
        self.turn()
        self.hub.forget_position("x")
        late = self.connect("late")
        self.hub.join(late, "x")
        complete = self.successResultOf(self.hub.replay(late, "x", self.epoch("x"), 0))
        self.assertTrue(complete)
        self.assertEqual(late.texts(), [("x", "one")])


class LocalNodesTests(SynchronousTestCase):
    def test_one_node(self):
        """The in-process backplane lists this node alone, with its clients."""
        hub = clocked_hub(Clock(), node_id="solo")
        hub.connect(RecordingMember("solo-1"))
        self.assertEqual(
            self.successResultOf(hub.backplane.nodes()),
            [{"node": "solo", "connections": 1, "heartbeat_age": None, "here": True, "alive": True}],
        )
