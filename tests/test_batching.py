"""
The batched fan-out: events of one reactor turn delivered together, in
order, framed once, each recipient written once; checked with a fake clock
and in-memory transports, and with real clients parsing real frames.
"""

import itertools
import socket

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.core.events import Event, EventBatch, Joined, Left, TextMessage, encoded
from broadcaster.core.hub import Hub
from broadcaster.core.permissions import parse_grants
from broadcaster.protocols.origin import OriginPolicy
from broadcaster.protocols.websocket import BroadcastServerFactory
from broadcaster.core.members import MemberBase
from tests.support import (
    LineClient,
    connect_client,
    connect_plain_clients,
    connect_raw,
    parse_frames,
    port_of,
    start_server,
)


class BatchRecorder(MemberBase):
    """A member that records the batches it is given."""

    name = None

    def __init__(self, member_id):
        self.id = member_id
        self.batches = []

    def deliver(self, event: Event) -> None:
        self.batches.append([event])

    def deliver_many(self, batch) -> None:
        self.batches.append(list(batch))

    def events(self):
        return [event for batch in self.batches for event in batch]


class Lister(BatchRecorder):
    """A member told a room's members when it joins (as a JSON client is)."""

    lists_members = True


class Exploding(BatchRecorder):
    def deliver_many(self, batch) -> None:
        raise OSError("connection reset")


class HubBatchingTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.hub = Hub(self.clock, node_id="n")

    def connect(self, member_id, cls=BatchRecorder):
        member = cls(member_id)
        self.hub.connect(member)
        return member

    def test_one_turn_is_one_batch_in_order(self):
        """Events of one turn are delivered together, at the end of the turn, in order."""
        ann = self.connect("ann")
        self.clock.advance(0)
        ann.batches.clear()
        for i in range(5):
            self.hub.publish_text("ann", str(i))
        self.assertEqual(ann.batches, [])
        self.clock.advance(0)
        self.assertEqual(len(ann.batches), 1)
        self.assertEqual([e.text for e in ann.batches[0]], list("01234"))
        self.assertEqual([e.seq for e in ann.batches[0]], [1, 2, 3, 4, 5])

    def test_order_across_batches(self):
        """Consecutive turns' batches arrive in order."""
        ann = self.connect("ann")
        for turn in range(3):
            for i in range(3):
                self.hub.publish_text("ann", "{}.{}".format(turn, i))
            self.clock.advance(0)
        texts = [e.text for e in ann.events() if isinstance(e, TextMessage)]
        self.assertEqual(texts, ["{}.{}".format(t, i) for t in range(3) for i in range(3)])

    def test_joining_mid_batch(self):
        """A member that joins during a turn gets that turn's events published after it
        connected, and its replay position excludes them (no duplicates on recovery)."""
        ann = self.connect("ann")
        self.clock.advance(0)
        before = self.successResultOf(self.hub.publish_text("ann", "before"))
        self.clock.advance(0)
        self.hub.publish_text("ann", "pending")
        bob = self.connect("bob")
        self.hub.publish_text("ann", "after")
        self.clock.advance(0)
        texts = [e.text for e in bob.events() if isinstance(e, TextMessage)]
        self.assertEqual(texts, ["pending", "after"])
        self.successResultOf(self.hub.replay(bob, "lobby", before.epoch, 0))
        # Bob gets only "before" replayed: the others reached him live.
        self.assertEqual(bob.batches[-1][0].text, "before")
        self.assertEqual(len(ann.events()), 5)

    def test_leaving_mid_batch(self):
        """A member gone before the end of the turn gets nothing of it; the others
        see its departure after the messages published before it."""
        ann = self.connect("ann")
        bob = self.connect("bob")
        self.clock.advance(0)
        ann.batches.clear()
        bob.batches.clear()
        self.hub.publish_text("ann", "one")
        self.hub.disconnect(bob)
        self.hub.publish_text("ann", "two")
        self.clock.advance(0)
        self.assertEqual(bob.batches, [])
        kinds = [(type(e).__name__, getattr(e, "text", None)) for e in ann.events()]
        self.assertEqual(kinds, [("TextMessage", "one"), ("Left", None), ("TextMessage", "two")])

    def test_failed_member_spares_the_others(self):
        """A member whose delivery raises is logged; the rest of the batch reaches everyone else."""
        ann = self.connect("ann")
        self.connect("broken", Exploding)
        bob = self.connect("bob")
        self.clock.advance(0)
        self.hub.publish_text("ann", "still")
        self.clock.advance(0)
        self.assertEqual(bob.events()[-1].text, "still")
        self.assertEqual(ann.events()[-1].text, "still")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)

    def test_rooms_are_batched_separately(self):
        """A member in two rooms gets each room's events; each room's order is kept."""
        ann = self.connect("ann")
        self.hub.join(ann, "dev")
        self.clock.advance(0)
        ann.batches.clear()
        self.hub.publish_text("ann", "l1")
        self.hub.publish_text("ann", "d1", "dev")
        self.hub.publish_text("ann", "l2")
        self.clock.advance(0)
        by_room = {}
        for event in ann.events():
            by_room.setdefault(event.room, []).append(event.text)
        self.assertEqual(by_room, {"lobby": ["l1", "l2"], "dev": ["d1"]})

    def test_members_without_deliver_many_get_events_one_by_one(self):
        """A member with only deliver() still gets every event."""

        class Simple(MemberBase):
            name = None

            def __init__(self):
                self.id = "simple"
                self.events = []

            def deliver(self, event):
                self.events.append(event)

        simple = Simple()
        self.hub.connect(simple)
        self.hub.publish_text("simple", "x")
        self.clock.advance(0)
        self.assertEqual(
            [type(e) for e in simple.events], [Joined, TextMessage]
        )
        self.assertNotIn(Left, [type(e) for e in simple.events])


class SlowMember(BatchRecorder):
    """A member whose delivery takes ``cost`` seconds of the hub's timer."""

    def __init__(self, member_id, timer, cost=0.0004):
        super().__init__(member_id)
        self.timer = timer
        self.cost = cost

    def deliver_many(self, batch) -> None:
        super().deliver_many(batch)
        self.timer.now += self.cost


class FakeTimer:
    """The hub's perf_counter, moved by the members' deliveries."""

    now = 0.0

    def __call__(self):
        return self.now


def turn(clock):
    """
    One reactor turn on ``clock``: run the calls due when it begins, as the
    reactor does (``Clock.advance`` would also run the calls they schedule
    for now, which a real reactor leaves for its next turn, after reading).
    """
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        if call.active():
            func, args, kw = call.func, call.args, call.kw
            call.cancel()
            func(*args, **kw)


class SlicedSweepTests(SynchronousTestCase):
    """
    A round to many members takes several reactor turns of
    ``hub.fanout.sweep_slice`` each, and what arrives meanwhile joins it.
    """

    def setUp(self):
        self.clock = Clock()
        self.timer = FakeTimer()
        self.hub = Hub(self.clock, node_id="n")
        self.hub.fanout.timer = self.timer
        self.hub.fanout.sweep_slice = 0.001
        self.hub.fanout.SLICE_CHECK = 1
        self.members = [self.connect("m{}".format(i)) for i in range(10)]
        self.hub.flush()
        for member in self.members:
            member.batches.clear()

    def connect(self, member_id):
        member = SlowMember(member_id, self.timer)
        self.hub.connect(member)
        return member

    def texts(self, member):
        return [[e.text for e in batch if isinstance(e, TextMessage)] for batch in member.batches]

    def test_a_round_is_delivered_in_slices(self):
        """Right after a round (setUp's), after sweep_slice seconds of
        sending the reactor gets a turn; the rest of the members follow in
        the next turns."""
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        # 0.4 ms each: the third delivery passes the 1 ms slice.
        self.assertEqual([len(m.batches) for m in self.members], [1] * 3 + [0] * 7)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), self.clock.seconds())
        turn(self.clock)
        turn(self.clock)
        turn(self.clock)
        self.assertEqual([self.texts(m) for m in self.members], [[["one"]]] * 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_round_after_a_quiet_spell_goes_out_whole(self):
        """Slicing is for rounds that overlap: a message published when no
        round has ended for a while reaches everyone in one turn."""
        self.timer.now += 1.0
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        self.assertEqual([self.texts(m) for m in self.members], [[["one"]]] * 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Published right after that round: this one is sliced.
        self.hub.publish_text("m0", "two")
        turn(self.clock)
        self.assertEqual([len(m.batches) for m in self.members], [2] * 3 + [1] * 7)

    def test_a_message_arriving_mid_round_joins_it(self):
        """Members still waiting get the new message in the same delivery as
        the first; those already served get it next; all in order."""
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        self.hub.publish_text("m0", "two")
        for _ in range(6):
            turn(self.clock)
        self.assertEqual([self.texts(m) for m in self.members[:3]], [[["one"], ["two"]]] * 3)
        self.assertEqual([self.texts(m) for m in self.members[3:]], [[["one", "two"]]] * 7)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_members_of_a_finished_sweep_get_what_comes_next(self):
        """While a later sweep is still under way, the members of one that
        has finished get the next messages too, each once, in order."""
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        self.hub.publish_text("m0", "two")
        turn(self.clock)
        turn(self.clock)
        turn(self.clock)
        # The first sweep is done; the one taking "two" to m0-m2 is under way.
        self.assertEqual([len(m.batches) for m in self.members], [2, 2, 1] + [1] * 7)
        self.hub.publish_text("m0", "three")
        self.hub.flush()
        self.assertEqual(
            [sum(self.texts(m), []) for m in self.members], [["one", "two", "three"]] * 10
        )

    def test_encodings_of_a_round_are_dropped_when_it_ends(self):
        """What the members encoded of a round's events, those that joined
        it under way included, is dropped once the round is done, and not
        before."""
        originals = {}

        def encoding(member):
            deliver_many = member.deliver_many

            def encode_then_deliver(batch):
                for event in batch:
                    encoded(event, "test", lambda e: b"frame")
                    originals[id(event)] = event
                deliver_many(batch)

            member.deliver_many = encode_then_deliver

        for member in self.members:
            encoding(member)
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        self.hub.publish_text("m0", "two")
        turn(self.clock)
        events = list(originals.values())
        self.assertTrue(events and all(event.wire for event in events))
        for _ in range(6):
            turn(self.clock)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual({text for m in self.members for t in self.texts(m) for text in t},
                         {"one", "two"})
        self.assertEqual([event.wire for event in originals.values()], [{}] * len(originals))

    def test_rejoining_after_being_served(self):
        """A member served in the round under way that leaves and comes back
        gets later messages once, not once per list it was in."""
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        self.hub.leave(self.members[1], "lobby")
        self.hub.join(self.members[1], "lobby")
        self.hub.publish_text("m0", "two")
        self.hub.flush()
        self.assertEqual(sum(self.texts(self.members[1]), []), ["one", "two"])
        self.assertEqual(sum(self.texts(self.members[7]), []), ["one", "two"])

    def test_presence_stays_with_those_who_may_see_it_mid_round(self):
        """A join merged into a round under way reaches the members still
        waiting who may see who comes and goes, and not one who may not
        (it gets the messages, in the same deliveries)."""
        blind = self.members[8]
        self.hub.regrant(blind, parse_grants({"lobby": ["join", "publish"]}))
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        self.connect("late")
        self.hub.publish_text("m0", "two")
        self.hub.flush()
        told = [(type(e).__name__, getattr(e, "text", None)) for e in blind.events()]
        self.assertEqual(told, [("TextMessage", "one"), ("TextMessage", "two")])
        self.assertEqual(
            [type(e).__name__ for e in self.members[9].events()],
            ["TextMessage", "Joined", "TextMessage"],
        )

    def test_joining_mid_round(self):
        """A member joining while a round is under way gets only later
        messages live, and its position makes a replay give it the rest
        exactly: nothing missed, nothing twice."""
        first = self.successResultOf(self.hub.publish_text("m0", "one"))
        turn(self.clock)
        late = self.connect("late")
        self.hub.publish_text("m0", "two")
        self.hub.flush()
        self.assertEqual([e.text for e in late.events() if isinstance(e, TextMessage)], ["two"])
        self.successResultOf(self.hub.replay(late, "lobby", first.epoch, 0))
        self.assertEqual(
            [e.text for e in late.events() if isinstance(e, TextMessage)], ["two", "one"]
        )
        self.assertEqual([self.texts(m)[-1] for m in self.members[3:]], [["one", "two"]] * 7)

    def test_leaving_mid_round(self):
        """A member that leaves while a round is under way gets nothing more
        of the room, even if it comes back before the round ends."""
        self.hub.join(self.members[8], "dev")
        self.hub.join(self.members[9], "dev")
        self.hub.flush()
        for member in self.members:
            member.batches.clear()
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        self.hub.disconnect(self.members[5])
        self.hub.leave(self.members[8], "lobby")
        self.hub.leave(self.members[9], "lobby")
        self.hub.join(self.members[9], "lobby")
        self.hub.flush()
        self.assertEqual(self.texts(self.members[5]), [])
        self.assertEqual(self.texts(self.members[8]), [])
        self.assertNotIn(["one"], self.texts(self.members[9]))
        self.assertEqual(self.texts(self.members[7]), [["one"]])

    def test_flush_finishes_every_round(self):
        """flush() (shutdown) delivers everything at once and leaves no timer."""
        self.hub.publish_text("m0", "one")
        turn(self.clock)
        self.hub.publish_text("m0", "two")
        self.hub.flush()
        self.assertEqual(
            [sum(self.texts(m), []) for m in self.members], [["one", "two"]] * 10
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PresencePaceTests(SynchronousTestCase):
    """
    In a big room, joins and leaves alone (a connection storm) go out at
    most a quarter of the time: a batch of them waits three times the last
    round's length after it; a message takes them out at once.  A member
    joining meanwhile is not told of those its welcome already lists.
    """

    def setUp(self):
        self.clock = Clock()
        self.timer = FakeTimer()
        self.hub = Hub(self.clock, node_id="n")
        self.hub.fanout.timer = self.timer
        # Each delivery 1 ms: a round to the 20 members takes 20 ms.
        self.members = [SlowMember("m{}".format(i), self.timer, cost=0.001) for i in range(20)]
        for member in self.members:
            self.hub.connect(member)
        self.hub.flush()
        for member in self.members:
            member.batches.clear()
        self.hub.publish_text("m0", "round")
        self.clock.advance(0)
        self.assertAlmostEqual(self.hub.fanout._last_round, 0.02)

    def comings(self, member):
        return [e.member for e in member.events() if isinstance(e, (Joined, Left))]

    def test_joins_wait_for_the_pace(self):
        """Joins still coming (one every 4 ms) right after a 20 ms round
        wait 60 ms, then go out in one batch."""
        for n in range(15):
            if n:
                self.clock.advance(0.004)
            self.hub.connect(BatchRecorder("late{}".format(n)))
        self.clock.advance(0.0039)
        self.assertEqual(self.comings(self.members[5]), [])
        self.clock.advance(0.0002)
        self.assertEqual(self.comings(self.members[5]), ["late{}".format(n) for n in range(15)])
        self.assertEqual(len(self.members[5].batches), 2)  # the round, then the joins

    def test_joins_no_longer_coming_go_out(self):
        """Once no join has come for 5 ms, those waiting go out without
        waiting for the rest of the pace: the end of a storm is not held."""
        self.hub.connect(BatchRecorder("late1"))
        self.clock.advance(0.003)
        self.hub.connect(BatchRecorder("late2"))
        self.clock.advance(0.0049)
        self.assertEqual(self.comings(self.members[5]), [])
        self.clock.advance(0.0002)
        self.assertEqual(self.comings(self.members[5]), ["late1", "late2"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_message_takes_them_out_at_once(self):
        """A message published while joins wait goes out at the end of its
        turn, after them, in one write."""
        self.hub.connect(BatchRecorder("late"))
        self.hub.publish_text("m0", "now")
        self.clock.advance(0)
        batch = self.members[5].batches[-1]
        self.assertEqual(
            [(type(e).__name__, getattr(e, "text", None)) for e in batch],
            [("Joined", None), ("TextMessage", "now")],
        )

    def test_a_newcomer_told_the_list_hears_only_what_came_after_it(self):
        """A member told the room's members on joining (a JSON client),
        connecting while joins and a leave wait, is not told of them (the
        list holds them), but of its own join, later ones, and the
        messages of that turn; one told no list (plain) hears them all."""
        self.hub.connect(BatchRecorder("early"))
        self.hub.disconnect(self.members[19])
        self.hub.publish_text("m0", "pending")
        newcomer = Lister("newcomer")
        self.hub.connect(newcomer)
        plain = BatchRecorder("plain")
        self.hub.connect(plain)
        self.hub.connect(BatchRecorder("after"))
        self.clock.advance(0.1)
        self.assertEqual(self.comings(newcomer), ["newcomer", "plain", "after"])
        self.assertEqual([e.text for e in newcomer.events() if isinstance(e, TextMessage)], ["pending"])
        self.assertEqual(self.comings(plain), ["early", "m19", "newcomer", "plain", "after"])
        self.assertEqual(self.comings(self.members[5]), ["early", "m19", "newcomer", "plain", "after"])
        listed = {seat.id for seat in self.hub.presence("lobby")}
        self.assertTrue({"early", "newcomer", "after"} <= listed and "m19" not in listed)

    def test_small_rooms_are_not_paced(self):
        """After a round shorter than a third of a millisecond, a join goes
        out at the end of its turn."""
        self.hub.fanout._last_round = 0.0003
        self.hub.connect(BatchRecorder("late"))
        self.clock.advance(0)
        self.assertEqual(self.comings(self.members[5]), ["late"])


class WebSocketBatchTests(SynchronousTestCase):
    """Batches on the wire: one write per client, identical bytes per wire format."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.hub = Hub(self.reactor, node_id="t")
        self.factory = BroadcastServerFactory(self.hub, OriginPolicy(), self.reactor)

    def connect(self):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        transport.clear()
        writes = []
        original = transport.write

        def write(data):
            writes.append(data)
            original(data)

        transport.write = write
        return protocol, transport, writes

    def test_one_write_per_client_with_identical_bytes(self):
        """Text and binary mixed: each client gets the turn's frames in one write, byte-exact."""
        ann, ann_t, ann_writes = self.connect()
        bob, bob_t, bob_writes = self.connect()
        self.reactor.advance(0)
        del ann_writes[:], bob_writes[:]
        self.hub.publish_text(ann.id, "hi")
        self.hub.publish_binary(ann.id, b"\x00\x01")
        self.hub.publish_text(ann.id, "x" * 200)
        self.reactor.advance(0)
        self.assertEqual(len(ann_writes), 1)
        self.assertEqual(ann_writes, bob_writes)
        frames, rest = parse_frames(ann_writes[0])
        self.assertEqual(rest, b"")
        self.assertEqual(
            [(f.opcode, f.payload) for f in frames],
            [(1, b"hi"), (2, b"\x00\x01"), (1, b"x" * 200)],
        )
        self.assertTrue(all(f.fin and not f.masked for f in frames))


class RealClientBatchTests(TestCase):
    @inlineCallbacks
    def test_bursts_parse_as_separate_messages_in_order(self):
        """A real Autobahn client parses a burst of batched frames (small and
        large, text and binary) into the same messages, in order."""
        _, port = yield start_server(self, ["--rate", "0"])
        (sender, _), (receiver, _) = yield connect_plain_clients(self, port, 2)
        sent = []
        for i in range(300):
            if i % 3 == 2:
                payload = bytes([i % 256]) * (i * 50)
                sender.sendMessage(payload, isBinary=True)
                sent.append((payload, True))
            else:
                text = "m{}".format(i) * (1 + i % 7)
                sender.send_text(text)
                sent.append((text.encode(), False))
        got = []
        for _ in range(300):
            got.append((yield receiver.next()))
        self.assertEqual(got, sent)


class RealClientSlicedSweepTests(TestCase):
    @inlineCallbacks
    def test_rounds_in_slices_reach_real_clients_in_order_once(self):
        """With rounds yielding every few clients, text and binary
        messages published while rounds are under way (merged into them)
        still reach every real client exactly once, in order, as separate
        messages."""
        service, port = yield start_server(self, ["--rate", "0"])
        # A clock that says each delivery took a second, and 5 s slices:
        # every round is under load, and takes eight reactor turns.
        service.hub.fanout.timer = itertools.count().__next__
        service.hub.fanout.sweep_slice = 5
        service.hub.fanout.SLICE_CHECK = 1
        clients = yield connect_plain_clients(self, port, 40)
        slices = []
        sweep = service.hub.fanout._sweep

        def counted(*args, **kwargs):
            slices.append(None)
            return sweep(*args, **kwargs)

        service.hub.fanout._sweep = counted
        sender = clients[0][0]
        sent = []
        for i in range(30):
            if i % 4 == 3:
                payload = bytes([i]) * (100 + i)
                sender.sendMessage(payload, isBinary=True)
                sent.append((payload, True))
            else:
                text = "burst {}".format(i)
                sender.send_text(text)
                sent.append((text.encode(), False))
            # One message per turn or two: each arrives mid-round.
            yield deferLater(reactor, 0, lambda: None)
        for client, _ in clients:
            got = []
            for _ in sent:
                got.append((yield client.next()))
            self.assertEqual(got, sent)
        self.assertEqual(service.hub.fanout._sweeps, {})
        # Rounds did take many reactor turns.
        self.assertGreater(len(slices), len(sent))


class BatchDelayTests(SynchronousTestCase):
    def test_batch_waits_for_the_delay(self):
        """With a batch delay, events published within it go out together, after it."""
        clock = Clock()
        hub = Hub(clock, node_id="n")
        hub.fanout.batch_delay = 0.003
        ann = BatchRecorder("ann")
        hub.connect(ann)
        clock.advance(0.003)
        ann.batches.clear()
        hub.publish_text("ann", "one")
        clock.advance(0.002)
        hub.publish_text("ann", "two")
        self.assertEqual(ann.batches, [])
        clock.advance(0.001)
        self.assertEqual([[e.text for e in batch] for batch in ann.batches], [["one", "two"]])

    def test_option_and_redis_default(self):
        """--batch-delay sets the delay; it defaults to 0, and to 3 ms with
        --redis when hiredis is missing."""
        from broadcaster.redis.backplane import RedisBackplane
        from broadcaster.service.tap import Options, makeService

        def hub_for(*args):
            options = Options()
            options.parseOptions(["--image-port", "none", "--line-port", "none", *args])
            return makeService(options, reactor=MemoryReactorClock()).hub

        redis = ("--redis", "redis://127.0.0.1:1/0")
        # The Redis backplane asks for the wait when hiredis is missing.
        self.patch(RedisBackplane, "batch_delay", 0.0)
        self.assertEqual(hub_for().fanout.batch_delay, 0)
        self.assertEqual(hub_for(*redis).fanout.batch_delay, 0)
        self.assertEqual(hub_for(*redis, "--batch-delay", "0.002").fanout.batch_delay, 0.002)
        self.assertEqual(hub_for("--batch-delay", "0.01").fanout.batch_delay, 0.01)
        self.patch(RedisBackplane, "batch_delay", 0.003)
        self.assertEqual(hub_for().fanout.batch_delay, 0)
        self.assertEqual(hub_for(*redis).fanout.batch_delay, 0.003)
        self.assertEqual(hub_for(*redis, "--batch-delay", "0").fanout.batch_delay, 0)


class FanOutUnitTests(SynchronousTestCase):
    """
    ``BroadcastServerProtocol.fan_out``'s contract with the hub, on
    in-memory transports (which it hands to ``deliver_many``).
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.hub = Hub(self.reactor, node_id="t")
        self.factory = BroadcastServerFactory(self.hub, OriginPolicy(), self.reactor)
        self.clients = [WebSocketBatchTests.connect(self) for _ in range(4)]
        self.reactor.advance(0)
        for _, transport, writes in self.clients:
            transport.clear()
            del writes[:]
        self.protocols = [protocol for protocol, _, _ in self.clients]
        self.hub.publish_text(self.protocols[0].id, "hi")
        # The batch is served by hand here, not by the engine.
        (event, _), = self.hub.fanout._batch
        self.hub.fanout._batch.clear()
        self.batch = EventBatch([event])

    def fan_out(self, members, index=0, occupants=None, deadline=None):
        if occupants is None:
            occupants = {member.id: member for member in members}
        return type(self.protocols[0]).fan_out(
            self.hub.fanout, self.batch, members, index, occupants, deadline
        )

    def written(self):
        return [len(writes) for _, _, writes in self.clients]

    def test_serves_the_run_and_stops_at_another_kind(self):
        """It serves its own kind from ``index`` on and returns where another kind begins."""
        other = BatchRecorder("line-1")
        members = [self.protocols[0], self.protocols[1], other, self.protocols[2]]
        self.assertEqual(self.fan_out(members), 2)
        self.assertEqual(other.batches, [])
        self.assertEqual(self.written(), [1, 1, 0, 0])
        self.assertEqual(self.fan_out(members, 3), 4)
        self.assertEqual(self.written(), [1, 1, 1, 0])

    def test_skips_members_gone_from_the_room(self):
        """A member no longer in the room (or replaced under its id) gets nothing."""
        occupants = {p.id: p for p in self.protocols}
        del occupants[self.protocols[1].id]
        self.assertEqual(self.fan_out(self.protocols, occupants=occupants), 4)
        self.assertEqual(self.written(), [1, 0, 1, 1])

    def test_stops_after_the_deadline(self):
        """Every SLICE_CHECK members it looks at hub.fanout.timer and returns once past the deadline."""
        timer = FakeTimer()
        self.hub.fanout.timer = timer
        self.hub.fanout.SLICE_CHECK = 2
        timer.now = 10.0
        self.assertEqual(self.fan_out(self.protocols, deadline=5.0), 2)
        self.assertEqual(self.written(), [1, 1, 0, 0])
        self.assertEqual(self.fan_out(self.protocols, 2, deadline=None), 4)
        self.assertEqual(self.written(), [1, 1, 1, 1])

    def test_a_failure_is_logged_and_the_rest_served(self):
        """A member whose delivery raises goes to the engine's delivery_failed; the others still get it."""

        class Broken:
            @property
            def paused(self):
                raise RuntimeError("broken buffer")

        self.protocols[1]._outbound = Broken()
        self.assertEqual(self.fan_out(self.protocols), 4)
        self.assertEqual(self.written(), [1, 0, 1, 1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_counts_frames_and_bytes(self):
        """What it sends is counted in the hub's statistics."""
        frames, size = self.hub.stats.frames_out, self.hub.stats.bytes_out
        self.fan_out(self.protocols)
        sent = sum(len(writes[0]) for _, _, writes in self.clients)
        self.assertEqual(self.hub.stats.frames_out - frames, 4)
        self.assertEqual(self.hub.stats.bytes_out - size, sent)


class RealClientFanOutTests(TestCase):
    """The fan-out's direct send() on real TCP connections."""

    @inlineCallbacks
    def setUp(self):
        self.service, port = yield start_server(self, ["--rate", "0"])
        self.hub = self.service.hub
        self.clients = yield connect_plain_clients(self, port, 3)

    @inlineCallbacks
    def test_a_broadcast_waits_behind_what_is_already_queued(self):
        """Bytes still queued in a client's transport go out before the broadcast."""
        (ann, ann_id), (bob, bob_id), (cat, _) = self.clients
        queued = b"q" * 5000
        # Queued in the transport, not yet sent: the socket itself is empty.
        self.hub.member(bob_id).sendMessage(queued, isBinary=True)
        self.hub.publish_text(ann_id, "after")
        self.hub.flush()
        self.assertEqual((yield bob.next()), (queued, True))
        self.assertEqual((yield bob.next_text()), "after")
        self.assertEqual((yield cat.next_text()), "after")
        self.assertEqual((yield ann.next_text()), "after")

    @inlineCallbacks
    def test_what_the_socket_does_not_take_follows_in_order(self):
        """A batch larger than the socket takes at once is queued for the
        rest, and arrives whole, before the next one."""
        (ann, ann_id), (bob, bob_id), _ = self.clients
        bob_transport = self.hub.member(bob_id).transport
        bob_transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 2000
        self.hub.publish_binary(ann_id, big)
        self.hub.flush()
        # The socket took part; the transport holds the rest.
        self.assertTrue(bob_transport.dataBuffer or bob_transport._tempDataLen)
        self.hub.publish_text(ann_id, "next")
        self.hub.flush()
        self.assertEqual((yield bob.next()), (big, True))
        self.assertEqual((yield bob.next_text()), "next")
        self.assertEqual((yield ann.next()), (big, True))

    @inlineCallbacks
    def test_kinds_interleaved_in_a_room_all_hear_it(self):
        """WebSocket and line clients joined in turn: the fan-out's runs of
        one kind and the hub's per-member delivery reach everyone."""
        (ann, ann_id), (bob, _), (cat, _) = self.clients
        line = yield connect_raw(self, port_of(self.service.line_endpoint), LineClient)
        yield line.next()
        for client, _ in self.clients:
            yield client.next_text()
        dan = yield connect_client(self, self.service.web_endpoint.port.getHost().port)
        yield dan.next_text()
        for client, _ in self.clients:
            yield client.next_text()
        yield line.next()
        ann.send_text("all of you")
        for client in (ann, bob, cat, dan):
            self.assertEqual((yield client.next_text()), "all of you")
        self.assertEqual((yield line.next()), "{}: all of you".format(ann_id))
