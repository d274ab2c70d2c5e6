"""
Tests for :mod:`broadcaster.redis.backplane`: its pure parts (addresses, the
wire format, presence bookkeeping) in memory, and servers sharing a real
``redis-server`` that the tests start on a free loopback port, kill and
restart.

In CI (``CI`` set) a missing ``redis-server`` fails these tests; elsewhere
they are skipped with the reason.
"""

import dataclasses
import io
import json
import os
import shutil
import signal
import tempfile

import treq
from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase, TestCase

import txredisapi
from broadcaster.core.events import BinaryMessage, ImageMessage, Joined, Left, Renamed, TextMessage
from broadcaster.core.moderation import Expulsion
from broadcaster.core.history import kept_size
from broadcaster.redis import connections as redis_connections
from broadcaster.redis.address import RedisAddress, parse_redis_url, redact_url
from broadcaster.redis.backplane import RedisBackplane
from broadcaster.redis.connections import HIREDIS, ReconnectingFactory, RedisConnections
from broadcaster.redis.codec import encode_event, parse_event
from broadcaster.redis.presence import Presence, RemoteMember
from broadcaster.redis.scripts import DEREGISTER, MISSED, POSITION, PUBLISH_TEXT, REGISTER
from broadcaster.service.tap import Options
from tests.support import (
    CollectingProcess,
    clocked_hub,
    immediate_hub,
    close_client,
    connect_client,
    free_port,
    start_server,
    start_twistd,
    wait_for,
)
from tests.test_batching import BatchRecorder
from tests.test_limits import StalledReader
from tests.core.test_hub import RecordingMember
from tests.test_rooms import join_chat, of_type, read_until
from tests.http.test_api import (
    KEY,
    api_request,
    disconnect,
    key_file,
    publish,
    refusal,
    sign_in,
    token_path,
)
from tests.http.test_tokens import SECRET

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)
#: redis-cli, to create a cluster (Debian's redis-tools, with redis-server).
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"

PASSWORD = "s3cret"


class AddressTests(SynchronousTestCase):
    def test_tcp_url(self):
        """A redis:// URL gives host, port, database and credentials, defaults filled in."""
        self.assertEqual(
            parse_redis_url("redis://:p%40ss@redis.example:6380/3"),
            RedisAddress(host="redis.example", port=6380, db=3, password="p@ss"),
        )
        self.assertEqual(parse_redis_url("redis://localhost"), RedisAddress(host="localhost"))
        self.assertEqual(
            parse_redis_url("redis://ann:pw@[::1]/"),
            RedisAddress(host="::1", password="pw", username="ann"),
        )

    def test_unix_url(self):
        """A unix: address gives the socket path and the optional db and password."""
        self.assertEqual(
            parse_redis_url("unix:/run/redis/redis.sock?db=2&password=x"),
            RedisAddress(path="/run/redis/redis.sock", db=2, password="x"),
        )
        self.assertEqual(parse_redis_url("unix:/tmp/r.sock"), RedisAddress(path="/tmp/r.sock"))

    def test_bad_urls(self):
        """Anything else is refused with the reason."""
        for url, reason in [
            ("http://localhost", "expected redis://"),
            ("redis://", "expected redis://"),
            ("redis://localhost:99999", "out of range"),
            ("redis://localhost/zero", "must be a number"),
            ("redis://localhost/0?x=1", "unexpected query"),
            ("unix:relative.sock", "absolute socket path"),
            ("unix:/tmp/r.sock?db=x", "must be a number"),
            ("unix:/tmp/r.sock?timeout=1", "unknown parameter"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parse_redis_url(url)
            self.assertIn(reason, str(caught.exception), url)

    def test_redacted(self):
        """The URL shown in logs and /healthz never holds the password."""
        self.assertEqual(
            parse_redis_url("redis://:secret@127.0.0.1:6390/1").redacted(),
            "redis://:***@127.0.0.1:6390/1",
        )
        self.assertEqual(parse_redis_url("redis://[::1]").redacted(), "redis://[::1]:6379/0")
        self.assertEqual(
            parse_redis_url("unix:/r.sock?db=4&password=secret").redacted(), "unix:/r.sock?db=4"
        )

    def test_without_password(self):
        """The URL a worker is given reads back as the same address without
        the password, user name, database and odd characters kept."""
        for url in [
            "redis://ann%40ops:pw@[::1]:6390/3",
            "redis://:pw@redis.example",
            "unix:/run/a%20b%3F.sock?db=2&password=pw",
            "unix:/tmp/r.sock",
        ]:
            address = parse_redis_url(url)
            again = parse_redis_url(address.without_password())
            self.assertEqual(again, dataclasses.replace(address, password=None), url)
            self.assertNotIn("pw", address.without_password())
        self.assertEqual(
            parse_redis_url("redis://ann:pw@h/1").without_password(), "redis://ann@h:6379/1"
        )

    def test_redact_url(self):
        """A URL that may not parse is shown with its password as ***."""
        for url, shown in [
            ("redis://:p@ss@h:99999", "redis://:***@h:99999"),
            ("redis://ann:pw@h/x", "redis://ann:***@h/x"),
            ("redis://ann@h", "redis://ann@h"),
            ("unix:/r.sock?password=pw&db=x", "unix:/r.sock?password=***&db=x"),
        ]:
            self.assertEqual(redact_url(url), shown)

    def test_options(self):
        """--redis is checked at start-up, naming the flag; --node-timeout must be positive."""
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--redis", "redis//nowhere"])
        self.assertIn("--redis", str(caught.exception))
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--node-timeout", "0"])
        options = Options()
        options.parseOptions(["--redis", "redis://127.0.0.1:7000", "--node-timeout", "1.5"])
        self.assertEqual(options["redis-address"], RedisAddress(host="127.0.0.1", port=7000))
        self.assertEqual((options["node-timeout"], options["redis-namespace"]), (1.5, "default"))


class MakeServiceTests(SynchronousTestCase):
    def test_redis_backplane_starts_before_the_listeners(self):
        """With --redis the hub gets a Redis backplane whose service comes
        before every listening port; without it nothing changes."""
        from broadcaster.core.backplane import LocalBackplane
        from broadcaster.redis.backplane import RedisBackplaneService
        from broadcaster.service.tap import makeService

        options = Options()
        options.parseOptions(
            ["--redis", "redis://127.0.0.1:7000/2", "--redis-namespace", "chat", "--node-id", "n1",
             "--history-memory", "5000000"]
        )
        service = makeService(options, reactor=MemoryReactorClock())
        backplane = service.hub.backplane
        self.assertIsInstance(backplane, RedisBackplane)
        self.assertEqual(
            (backplane.channel, backplane.node_id, backplane.node_timeout, backplane.memory.limit),
            ("broadcaster:chat:events:db2", "n1", 15.0, 5000000),
        )
        # Started first and stopped last (the service starts its children
        # in order, and stops them one by one in reverse): the listeners
        # are in the last child, the clients.
        children = list(service)
        self.assertIsInstance(children[0], RedisBackplaneService)
        self.assertIs(children[-1], service.clients)
        self.assertTrue([child for child in service.clients if hasattr(child, "endpoint")])
        plain = makeService(Options(), reactor=MemoryReactorClock())
        self.assertIsInstance(plain.hub.backplane, LocalBackplane)
        self.assertFalse([c for c in plain if isinstance(c, RedisBackplaneService)])


class WireTests(SynchronousTestCase):
    def test_round_trip(self):
        """Every kind of event survives publication, raw bytes included."""
        events = [
            Joined(ts=1.5, room="dev", member="a-1", name="Ann"),
            Left(ts=2.25, room="dev", member="a-1", name=None),
            Renamed(ts=3.0, room="lobby", member="a-1", name="Ännchen"),
            BinaryMessage(ts=4.0, sender="a-1", data=b"\x00 1 \n\xff\r\n"),
            ImageMessage(
                ts=5.0, sender="a-1", image_id="a-img1", png=b"\x89PNG\n\x00", width=2, height=3
            ),
        ]
        for event in events:
            self.assertEqual(parse_event(b"0 - " + encode_event(event, "a", 7)), event)

    def test_text_is_numbered_by_its_prefix(self):
        """A text message's seq and epoch come from the prefix the script writes."""
        message = TextMessage(ts=1.0, room="dev", sender="a-1", text="hi\nthere \u2028", name="Ann")
        entry = b"42 0a1b2c " + encode_event(message, "a", 1)
        parsed = parse_event(entry)
        self.assertEqual((parsed.seq, parsed.epoch, parsed.text), (42, "0a1b2c", message.text))

    def test_garbage_is_refused(self):
        """What is not a published event raises ValueError."""
        for entry in [b"", b"0 - [1]", b"0 - {\"t\": \"Nope\"}", b"0 - {\"t\": \"Joined\"}"]:
            self.assertRaises(ValueError, parse_event, entry)


class PresenceTests(SynchronousTestCase):
    def test_events_keep_it_current(self):
        """Joins, renames and leaves of other nodes' members update the room lists."""
        presence = Presence()
        presence.apply("b", Joined(ts=0, room="lobby", member="b-1", name="Bob"))
        presence.apply("b", Joined(ts=0, room="dev", member="b-1", name="Bob"))
        presence.apply("c", Joined(ts=0, room="dev", member="c-1", name=None))
        presence.apply("b", Renamed(ts=0, room="dev", member="b-1", name="Robert"))
        self.assertEqual(
            presence.roster.seats("dev"), [RemoteMember("b-1", "Robert"), RemoteMember("c-1", None)]
        )
        presence.apply("b", Left(ts=0, room="dev", member="b-1", name="Robert"))
        presence.apply("b", Left(ts=0, room="lobby", member="b-1", name="Robert"))
        self.assertEqual(presence.roster.seats("dev"), [RemoteMember("c-1", None)])
        self.assertEqual(presence.roster.seats("lobby"), [])
        self.assertEqual(presence.nodes(), ["c"])

    def test_a_user_on_two_nodes_is_one_seat(self):
        """Connections of one user on several nodes are one seat with their
        count, kept until the last of them leaves."""
        presence = Presence()
        presence.apply("b", Joined(ts=0, room="dev", member="b-1", name="Ann", user="u-1"))
        presence.apply("c", Joined(ts=0, room="dev", member="c-7", name="Ann", user="u-1"))
        [seat] = presence.roster.seats("dev")
        self.assertEqual((seat.user, seat.name, seat.connections), ("u-1", "Ann", 2))
        presence.apply("b", Left(ts=0, room="dev", member="b-1", name="Ann", user="u-1"))
        [seat] = presence.roster.seats("dev")
        self.assertEqual(seat.connections, 1)
        presence.apply("c", Left(ts=0, room="dev", member="c-7", name="Ann", user="u-1"))
        self.assertEqual(presence.roster.seats("dev"), [])

    def test_replace_announces_the_difference(self):
        """A node's new state yields exactly the leaves, renames and joins
        it amounts to, announced only where a seat comes, goes or changes
        its name."""
        presence = Presence()
        presence.apply("b", Joined(ts=0, room="lobby", member="b-1", name="Bob"))
        presence.apply("b", Joined(ts=0, room="dev", member="b-1", name="Bob"))
        presence.apply("b", Joined(ts=0, room="lobby", member="b-2", name="Cy"))
        presence.apply("c", Joined(ts=0, room="lobby", member="c-1", name="Di", user="u-di"))
        events = presence.replace(
            "b",
            {
                "b-1": {"name": "Rob", "rooms": ["lobby"]},
                "b-3": {"name": None, "rooms": ["lobby"]},
                "b-4": {"name": "Di", "user": "u-di", "rooms": ["lobby"]},
            },
            9.0,
        )
        self.assertEqual(
            events,
            [
                Left(ts=9.0, room="dev", member="b-1", name="Bob"),
                Left(ts=9.0, room="lobby", member="b-2", name="Cy"),
                Renamed(ts=9.0, room="lobby", member="b-1", name="Rob"),
                Joined(ts=9.0, room="lobby", member="b-3", name=None),
                Joined(
                    ts=9.0, room="lobby", member="b-4", name="Di", user="u-di",
                    connections=2, announced=False,
                ),
            ],
        )
        self.assertEqual([m.id for m in presence.roster.seats("lobby")], ["b-1", "user:u-di", "b-3"])
        gone = presence.replace("b", {}, 10.0)
        self.assertEqual(
            {(e.member, e.room, e.announced) for e in gone},
            {("b-1", "lobby", True), ("b-3", "lobby", True), ("b-4", "lobby", False)},
        )
        self.assertEqual(presence.nodes(), ["c"])


class FakeCommands:
    """
    Stands in for the command connection: every call is recorded with a
    Deferred the test answers.
    """

    connected = 1

    def __init__(self) -> None:
        self.calls: list = []

    def run_script(self, script, keys, args):
        d = Deferred()
        self.calls.append((script, keys, args, d))
        return d

    def run(self, command, *args):
        d = Deferred()
        self.calls.append((command, [], list(args), d))
        return d


class FakeSubscription:
    connected = 1

    def __init__(self) -> None:
        self.channels: list = []

    def subscribe(self, channels):
        self.channels += channels
        return succeed(None)

    def ssubscribe(self, channel):
        self.channels.append(channel)
        return succeed(None)

    def sunsubscribe(self, channel):
        self.channels.remove(channel)
        return succeed(None)


class FakeConnections:
    """
    Stands in for :class:`RedisConnections`: the test plays Redis's
    comings and goings through the listener the backplane gives it.
    """

    def __init__(self) -> None:
        self.listener = None
        self.disconnected = False

    def connect(self, listener) -> None:
        self.listener = listener

    def disconnect(self):
        self.disconnected = True
        return succeed(None)

    def come_up(self, commands: FakeCommands) -> None:
        """Both connections are up and Redis accepts the registration."""
        self.listener.commands_ready(commands)
        self.listener.subscription_ready(FakeSubscription())
        (register,) = [call for call in commands.calls if call[0] is REGISTER]
        commands.calls.remove(register)
        register[3].callback([1])
        # The lobby's channel is received from where its sequence stands.
        for call in [call for call in commands.calls if call[0] is POSITION]:
            commands.calls.remove(call)
            call[3].callback([b"e0", 0])


def pubsub_message(channel: bytes, payload: bytes) -> bytes:
    """A pub/sub message as Redis writes it to a subscriber (RESP)."""
    parts = [b"message", channel, payload]
    return b"*3\r\n" + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in parts
    )


class SubscriptionParsingTests(SynchronousTestCase):
    """
    How events read from the subscription reach a batching hub.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.connections = FakeConnections()
        self.backplane = RedisBackplane(
            RedisAddress(host="127.0.0.1"), clock=self.clock, connections=self.connections
        )
        self.hub = clocked_hub(self.clock, node_id="b", backplane=self.backplane)
        self.backplane.start()
        self.member = BatchRecorder("b-1")
        self.hub.connect(self.member)
        self.connections.come_up(FakeCommands())
        self.clock.advance(0)
        self.member.batches.clear()

    def test_one_read_is_one_batch(self):
        """With hiredis, the events of one read from Redis reach the hub in
        that turn and go out to each member in one batch, in order."""
        if not HIREDIS:
            raise SkipTest("hiredis is not installed (it is a dependency)")
        factory = ReconnectingFactory(
            self.backplane.address, self.backplane, self.clock, subscriber=True
        )
        protocol = factory.buildProtocol(None)
        channel = self.backplane.channel.encode()
        read = b"".join(
            pubsub_message(
                channel,
                b"%d e1 " % seq
                + encode_event(TextMessage(ts=1.0, room="lobby", sender="a-1", text=str(seq)), "a", seq),
            )
            for seq in (1, 2, 3)
        )
        protocol.dataReceived(read)
        self.clock.advance(0)
        self.assertEqual(
            [[(e.text, e.seq, e.epoch) for e in batch] for batch in self.member.batches],
            [[("1", 1, "e1"), ("2", 2, "e1"), ("3", 3, "e1")]],
        )

    def test_without_hiredis_a_warning(self):
        """Without hiredis, connecting logs a warning that says what to
        install."""
        self.patch(redis_connections, "HIREDIS", False)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connections = RedisConnections(RedisAddress(host="127.0.0.1"), MemoryReactorClock())
        connections.connect(self.backplane)
        self.addCleanup(lambda: [f.stopTrying() for f in connections.factories])
        warnings = [e for e in logged if "hiredis" in e.get("log_format", "")]
        self.assertEqual([e["log_level"] for e in warnings], [LogLevel.warn])
        self.assertIn("pip install hiredis", warnings[0]["log_format"])


class BackplaneTests(SynchronousTestCase):
    """
    The backplane's bookkeeping, with fake connections: what happens to
    this node's publications when Redis goes away at any point.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.connections = FakeConnections()
        self.backplane = RedisBackplane(
            RedisAddress(host="127.0.0.1"),
            history_size=5,
            clock=self.clock,
            connections=self.connections,
        )
        self.hub = immediate_hub(self.clock, node_id="a", backplane=self.backplane)
        self.member = RecordingMember("a-1", "ann")
        self.backplane.start()
        self.hub.connect(self.member)
        self.commands = FakeCommands()
        self.connections.come_up(self.commands)
        self.assertTrue(self.backplane.connected)
        self.events_channel = self.backplane.channel.encode()

    def published(self, call, seq=0, epoch="-"):
        """What the subscription brings back for a recorded call."""
        script, keys, args, _ = call
        if script is PUBLISH_TEXT:
            (body,) = args[4:]
            return "{} {} ".format(seq, epoch).encode() + body
        return args[-1]

    def comes_back(self, call, seq=0, epoch="-"):
        """The subscription brings back the publication of a recorded call."""
        self.connections.listener.message_received(
            self.events_channel, self.published(call, seq, epoch)
        )

    def texts(self):
        return [(e.text, e.seq, e.epoch) for e in self.member.events if isinstance(e, TextMessage)]

    def test_expel_goes_to_the_other_nodes_and_to_no_client(self):
        """An expulsion is carried out here and published as an expel
        control message; one from another node is carried out, one of this
        node's own or an unreadable one is not, and none reaches a client."""
        expelled = []
        self.member.expel = lambda reason: expelled.append(reason) or True
        self.member.events.clear()
        result = self.hub.expel(Expulsion(client="a-1", reason="bye", by="1a2b3c4d"))
        ((command, _, (channel, payload), answer),) = self.commands.calls
        self.assertEqual((command, channel, expelled), ("PUBLISH", self.backplane.channel, ["bye"]))
        self.assertTrue(payload.startswith(b"0 - "))
        body = json.loads(payload[4:])
        ident = body.pop("x")
        self.assertRegex(ident, "^[0-9a-f]{16}$")
        self.assertEqual(
            body,
            {
                "t": "expel",
                "o": "a",
                "by": "1a2b3c4d",
                "user": None,
                "client": "a-1",
                "reason": "bye",
                "ban_seconds": 0,
            },
        )
        answer.callback(1)
        self.assertEqual(self.successResultOf(result), (1, True))
        self.connections.listener.message_received(self.events_channel, payload)
        self.assertEqual(expelled, ["bye"])
        from_b = payload.replace(b'"o":"a"', b'"o":"b"')
        self.connections.listener.message_received(self.events_channel, from_b)
        self.assertEqual(expelled, ["bye", "bye"])
        # The same message again (through another --redis server): once.
        self.connections.listener.message_received(self.events_channel, from_b)
        self.assertEqual(expelled, ["bye", "bye"])
        unreadable = from_b.replace(b'"ban_seconds":0', b'"ban_seconds":-5').replace(
            ident.encode("ascii"), b"another"
        )
        self.connections.listener.message_received(self.events_channel, unreadable)
        self.assertEqual(expelled, ["bye", "bye"])
        self.assertEqual(self.member.events, [])

    def test_expel_says_when_the_others_could_not_be_told(self):
        """If Redis does not take the control message, the hub says the
        other nodes were not told; during an outage it does not try."""
        result = self.hub.expel(Expulsion(user="u-ann", ban_seconds=60))
        self.commands.calls[0][3].errback(txredisapi.ConnectionError("gone"))
        self.assertEqual(self.successResultOf(result), (0, False))
        self.assertEqual(self.hub.banned("u-ann"), 60)
        self.connections.listener.commands_lost(self.commands)
        result = self.hub.expel(Expulsion(user="u-bob"))
        self.assertEqual(self.successResultOf(result), (0, False))

    def test_exactly_once_whenever_redis_goes(self):
        """Whether the connection went before or after Redis answered, and
        before or after the subscription brought a message back, each is
        delivered once and every publication is answered."""
        acks = []
        for text in ("one", "two", "three", "four"):
            # Each in a reactor turn of its own: each is a script of its own.
            acks.append(self.hub.publish_text("a-1", text))
            self.clock.advance(0)
        one, two, three, four = self.commands.calls
        # "one" is back through the subscription; its answer will fail.
        self.comes_back(one, 1, "e1")
        # "two" is answered but not back yet; "three" ran but its answer
        # is lost; "four" never reached Redis.
        two[3].callback([2, b"e1"])
        self.connections.listener.commands_lost(self.commands)
        self.assertFalse(self.backplane.connected)
        for _, _, _, d in (one, three, four):
            d.errback(txredisapi.ConnectionError("Lost connection"))
        # The subscription outlives the command connection a little.
        self.comes_back(two, 2, "e1")
        self.comes_back(three, 3, "e1")
        self.assertEqual(
            self.texts(),
            [
                ("one", 1, "e1"),
                ("two", 2, "e1"),
                ("three", 1, "local-a-2"),
                ("four", 2, "local-a-2"),
            ],
        )
        self.assertEqual([self.successResultOf(ack).seq for ack in acks], [1, 2, 1, 2])
        self.assertEqual(self.backplane.state()["local_only"], 2)

    def test_a_turns_texts_are_numbered_and_published_together(self):
        """The text messages of a room that one reactor turn publishes go
        to Redis in one script, come back as one batch, and are each
        delivered once, in order, with their own numbers; a binary message
        published after them in that turn follows them."""
        acks = [self.hub.publish_text("a-1", text) for text in ("one", "two", "three")]
        self.hub.publish_binary("a-1", b"\x00\x01")
        self.assertEqual(self.texts(), [])  # nothing is back yet
        (texts, binary) = self.commands.calls
        self.assertIs(texts[0], PUBLISH_TEXT)
        self.assertEqual(binary[0], "SPUBLISH")
        self.assertEqual(len(texts[2][4:]), 3)
        texts[3].callback([5, b"e1"])
        entries = [b"%d e1 " % (5 + i) + body for i, body in enumerate(texts[2][4:])]
        batch = b"*" + b" ".join(b"%d" % len(e) for e in entries) + b"\n" + b"".join(entries)
        self.connections.listener.message_received(b"room", batch)
        self.assertEqual(self.texts(), [("one", 5, "e1"), ("two", 6, "e1"), ("three", 7, "e1")])
        self.assertEqual([self.successResultOf(ack).seq for ack in acks], [5, 6, 7])

    def test_a_batch_that_fails_is_delivered_here(self):
        """A batch Redis did not take, or that was still to be sent when
        Redis went, is delivered here once, in the outage's numbering."""
        for text in ("one", "two"):
            self.hub.publish_text("a-1", text)
        self.clock.advance(0)
        (texts,) = self.commands.calls
        texts[3].errback(txredisapi.ConnectionError("Lost connection"))
        self.assertEqual(self.texts(), [("one", 1, "local-a-2"), ("two", 2, "local-a-2")])
        commands = FakeCommands()
        self.connections.come_up(commands)
        self.hub.publish_text("a-1", "queued")
        self.connections.listener.commands_lost(commands)
        self.clock.advance(0)
        self.assertEqual(self.texts()[-1], ("queued", 1, "local-a-3"))
        self.assertEqual([call for call in commands.calls if call[0] is PUBLISH_TEXT], [])

    def test_unreadable_batches_are_ignored(self):
        """A batch whose lengths do not fit is logged and dropped; the next
        message is delivered."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        entry = b"1 e1 " + encode_event(
            TextMessage(ts=0, room="lobby", sender="b-1", text="fine"), "b", 1
        )
        for bad in (b"*3 4", b"*x\nabc", b"*2 2\nabc", b"*0\n", b"*%d\n%s" % (len(entry) + 1, entry)):
            self.connections.listener.message_received(b"room", bad)
        self.connections.listener.message_received(b"room", entry)
        self.assertEqual(self.texts(), [("fine", 1, "e1")])
        self.assertEqual(
            len([e for e in log if "unreadable batch" in e.get("log_format", "")]), 5
        )

    def test_only_redis_numbers_move_the_join_position(self):
        """A member joining during an outage has seen live everything up to
        the last message Redis numbered, not the outage's local ones: once
        Redis is back, its replay from Redis stops there."""
        self.hub.publish_text("a-1", "one")
        self.clock.advance(0)
        (one,) = self.commands.calls
        one[3].callback([1, b"e1"])
        self.comes_back(one, 1, "e1")
        self.connections.listener.commands_lost(self.commands)
        self.hub.publish_text("a-1", "local")
        self.assertEqual(self.texts()[-1], ("local", 1, "local-a-2"))
        late = RecordingMember("a-2", "bo")
        self.hub.connect(late)
        commands = FakeCommands()
        self.connections.come_up(commands)
        d = self.hub.replay(late, "lobby", "e1", 0)
        # Meanwhile another node published "two" in Redis's sequence.
        two = "2 e1 ".encode() + encode_event(
            TextMessage(ts=0, room="lobby", sender="b-1", text="two"), "b", 1
        )
        (missed,) = [call for call in commands.calls if call[0] is MISSED]
        missed[3].callback([b"e1", 2, [self.published(one, 1, "e1"), two]])
        self.assertTrue(self.successResultOf(d))
        self.assertEqual([e.text for e in late.events if isinstance(e, TextMessage)], ["one"])

    def test_local_numbering_during_an_outage(self):
        """While down, messages are numbered in a local epoch, positions and
        history answer from it, and replays of other epochs say incomplete."""
        self.connections.listener.commands_lost(self.commands)
        for text in ("x", "y"):
            self.hub.publish_text("a-1", text)
        self.assertEqual(self.texts(), [("x", 1, "local-a-2"), ("y", 2, "local-a-2")])
        self.assertEqual(self.successResultOf(self.hub.position("lobby")), ("local-a-2", 2))
        history = self.successResultOf(self.backplane.history("lobby", 10))
        self.assertEqual([m.text for m in history], ["x", "y"])
        self.assertEqual(
            self.successResultOf(self.backplane.missed("lobby", "e1", 4, None)), ([], False)
        )
        messages, complete = self.successResultOf(
            self.backplane.missed("lobby", "local-a-2", 1, None)
        )
        self.assertEqual(([m.text for m in messages], complete), (["y"], True))

    def test_the_outage_history_is_bounded_by_history_memory(self):
        """What a node keeps locally while Redis is down counts against
        --history-memory: past it the oldest local messages go, and a replay
        that needed them is incomplete; once Redis is back it is let go."""
        memory = self.backplane.memory
        memory.limit = 5000
        self.connections.listener.commands_lost(self.commands)
        for i in range(5):
            self.hub.publish_text("a-1", str(i) * 1000)
        self.assertEqual((memory.used, memory.evicted), (3 * kept_size(self.member.events[-1]), 2))
        messages, complete = self.successResultOf(self.backplane.missed("lobby", "local-a-2", 0, None))
        self.assertEqual(([m.text[0] for m in messages], complete), (["2", "3", "4"], False))
        messages, complete = self.successResultOf(self.backplane.missed("lobby", "local-a-2", 2, None))
        self.assertEqual(([m.text[0] for m in messages], complete), (["2", "3", "4"], True))
        self.connections.come_up(FakeCommands())
        self.assertEqual(memory.used, 0)

    def test_position_falls_back_when_redis_fails(self):
        """A welcome never waits on a failed position: it gets the local one."""
        d = self.hub.position("lobby")
        self.commands.calls[-1][3].errback(txredisapi.TimeoutError("no answer"))
        self.assertEqual(self.successResultOf(d), ("local-a-1", 0))

    def test_missed_follows_the_local_semantics(self):
        """Replays from Redis stop at the member's join position and say
        whether nothing was forgotten, as the in-process backplane does."""
        entries = [
            "{} e1 ".format(seq).encode()
            + encode_event(TextMessage(ts=0, room="lobby", sender="b-1", text=str(seq)), "b", seq)
            for seq in (3, 4, 5, 6)
        ]
        d = self.backplane.missed("lobby", "e1", 2, ("e1", 5))
        self.commands.calls[-1][3].callback([b"e1", 6, entries])
        messages, complete = self.successResultOf(d)
        self.assertEqual(([m.seq for m in messages], complete), ([3, 4, 5], True))
        d = self.backplane.missed("lobby", "e1", 1, ("e1", 5))
        self.commands.calls[-1][3].callback([b"e1", 6, entries])
        self.assertEqual(self.successResultOf(d)[1], False)
        d = self.backplane.missed("lobby", "e0", 1, ("e0", 9))
        self.commands.calls[-1][3].callback([b"e1", 6, entries])
        self.assertEqual(self.successResultOf(d), ([], False))

    def test_stopping_deregisters_then_disconnects(self):
        """Stopping tells the other nodes this node's clients are gone, and
        only then closes the connections."""
        d = self.backplane.stop()
        (deregister,) = self.commands.calls
        self.assertIs(deregister[0], DEREGISTER)
        self.assertFalse(self.connections.disconnected)
        deregister[3].callback(1)
        self.successResultOf(d)
        self.assertTrue(self.connections.disconnected)


# Integration with a real redis-server


def require_redis_server():
    """
    Skip (or, in CI, fail) when there is no redis-server to run.
    """
    if REDIS_SERVER is None:
        if os.environ.get("CI"):
            raise FailTest("CI is set but redis-server is not installed (.ci/run installs it)")
        raise SkipTest("redis-server is not installed (apt-get install redis-server)")


class _RedisProcess(ProcessProtocol):
    def __init__(self, ready_line: bytes = b"Ready to accept connections") -> None:
        self.output = b""
        self.ready: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self._ready_line = ready_line

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.ready.called and self._ready_line in self.output:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(
                FailTest("redis-server exited: {}".format(self.output.decode("utf-8", "replace")))
            )
        self.ended.callback(None)


class RedisServer:
    """
    A throw-away redis-server on a free loopback port (and a Unix socket),
    without persistence, with a password, stopped when the test ends.
    """

    def __init__(self, testcase, *extra: str) -> None:
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="redis-")
        self.socket = os.path.join(self.directory, "redis.sock")
        self.process = None
        #: More arguments (a replica's --replicaof).
        self.extra = list(extra)
        testcase.addCleanup(self._clean_up)

    @property
    def url(self) -> str:
        return "redis://:{}@127.0.0.1:{}/0".format(PASSWORD, self.port)

    @inlineCallbacks
    def start(self):
        """Start it; fires once it accepts connections."""
        argv = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--requirepass", PASSWORD,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", "",
            "--daemonize", "no",
            *self.extra,
        ]
        self.process = _RedisProcess()
        reactor.spawnProcess(self.process, REDIS_SERVER, argv, env=os.environ)
        self.process.ready.addTimeout(20, reactor)
        yield self.process.ready

    @inlineCallbacks
    def command(self, *args):
        """Run one command on a connection of its own; fires with the reply."""
        connection = yield txredisapi.Connection(
            "127.0.0.1", self.port, password=PASSWORD, reconnect=False
        )
        try:
            reply = yield connection.execute_command(*args)
        finally:
            yield connection.disconnect()
        return reply

    def kill(self) -> Deferred:
        """SIGKILL it, as a crash would; fires once it is gone."""
        process, self.process = self.process, None
        process.transport.signalProcess("KILL")
        return process.ended

    @inlineCallbacks
    def _clean_up(self):
        if self.process is not None:
            yield self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


class Sentinel:
    """
    A throw-away Redis Sentinel (``redis-server --sentinel``) watching the
    master ``mymaster``, deciding quickly (a second without answers is
    down), stopped when the test ends.
    """

    def __init__(self, testcase, master: "RedisServer", quorum: int = 2) -> None:
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="sentinel-")
        self.config = os.path.join(self.directory, "sentinel.conf")
        with open(self.config, "w") as f:
            f.write(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n"
                "sentinel monitor mymaster 127.0.0.1 {master} {quorum}\n"
                "sentinel auth-pass mymaster {password}\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 4000\n"
                "sentinel parallel-syncs mymaster 1\n".format(
                    port=self.port, dir=self.directory, master=master.port, quorum=quorum,
                    password=PASSWORD,
                )
            )
        self.process = None
        testcase.addCleanup(self._clean_up)

    @inlineCallbacks
    def start(self):
        self.process = _RedisProcess(b"+monitor master mymaster")
        sentinel = shutil.which("redis-sentinel")
        if sentinel is None and os.environ.get("CI"):
            raise FailTest("CI is set but redis-sentinel is not installed (.ci/run installs it)")
        # Debian's redis-sentinel, as deployments run it; else the same
        # program as redis-server --sentinel.
        argv = [sentinel, self.config] if sentinel else [REDIS_SERVER, self.config, "--sentinel"]
        reactor.spawnProcess(self.process, argv[0], argv, env=os.environ)
        self.process.ready.addTimeout(20, reactor)
        yield self.process.ready

    @inlineCallbacks
    def command(self, *args):
        connection = yield txredisapi.Connection("127.0.0.1", self.port, reconnect=False)
        try:
            reply = yield connection.execute_command(*args)
        finally:
            yield connection.disconnect()
        return reply

    @inlineCallbacks
    def _clean_up(self):
        if self.process is not None:
            self.process.transport.signalProcess("KILL")
            yield self.process.ended
        shutil.rmtree(self.directory, ignore_errors=True)


@inlineCallbacks
def redis_servers(testcase, count):
    """
    Start ``count`` throw-away redis-servers (skipping, or in CI failing,
    without redis-server); fires with them, each stopped when the test ends.
    """
    require_redis_server()
    servers = [RedisServer(testcase) for _ in range(count)]
    for server in servers:
        yield server.start()
    return servers


@inlineCallbacks
def poll(check, what, timeout=30.0):
    """
    Call ``check()`` (a Deferred-returning function) until it fires with a
    true value, every 0.1 s, failing after ``timeout`` seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        try:
            value = yield check()
        except Exception:
            value = None
        if value:
            return value
        if reactor.seconds() > deadline:
            raise FailTest("timed out after {}s waiting for {}".format(timeout, what))
        yield deferLater(reactor, 0.1, lambda: None)


@inlineCallbacks
def fail_over(testcase, master, nodes, sender, receiver, room):
    """
    Kill ``master`` once its replica has everything (replication is
    asynchronous: what a master took and had not passed on is lost, see
    docs/redis.rst), wait until every node has seen the outage and found
    the new master, then have ``sender`` say "after" in ``room``.

    :return: the messages ``receiver`` got, up to "after".
    """
    testcase.assertEqual((yield master.command("WAIT", 1, 5000)), 1)
    yield master.kill()
    for node in nodes:
        yield wait_for(lambda: not node.hub.backplane.connected, what="the outage seen")
    for node in nodes:
        yield wait_for(lambda: node.hub.backplane.connected, timeout=60, what="the new master found")
    sender.send_json({"type": "message", "room": room, "text": "after"})
    after = []
    while not after or after[-1]["text"] != "after":
        # Generous: each node subscribes again and reads where the room
        # stands on the new master first, which a loaded machine slows.
        event = yield receiver.next_json(timeout=30)
        if event["type"] == "message":
            after.append(event)
    return after


@inlineCallbacks
def start_node(testcase, redis, node, *args, url=None):
    """
    Start a server with ``--redis`` as node ``node`` and wait until it is
    registered with Redis.
    """
    service, port = yield start_server(
        testcase, ["--redis", url or redis.url, "--node-id", node, *args]
    )
    yield wait_for(lambda: service.hub.backplane.connected, what="node {} in Redis".format(node))
    return service, port


def ids(members):
    return {member.id for member in members}


def users(seats):
    """
    How many connections each signed-in user has in a presence list.
    """
    return {seat.user: seat.connections for seat in seats if seat.user is not None}


@inlineCallbacks
def messages_until(client, text):
    """
    Read events until the message ``text``; return the messages read.
    """
    events = yield read_until(client, of_type("message", text=text), limit=5000)
    return [e for e in events if e["type"] == "message"]


@inlineCallbacks
def join_room(client, room, since=None):
    """
    Have ``client`` join ``room`` (recovering from ``since``); fires with
    the room's presence list, which answers the join.
    """
    request = {"type": "join", "room": room}
    if since is not None:
        request["since"] = since
    client.send_json(request)
    return (yield read_until(client, of_type("presence", room=room)))[-1]


def script_runs(info) -> int:
    """
    How many scripts Redis ran (EVAL and EVALSHA), from ``INFO commandstats``.
    """
    if isinstance(info, bytes):
        info = info.decode("ascii")
    runs = 0
    for line in info.splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            runs += int(line.split("calls=", 1)[1].split(",", 1)[0])
    return runs


class RedisTestCase(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self):
        require_redis_server()
        self.redis = RedisServer(self)
        yield self.redis.start()


class RoomKeyTests(RedisTestCase):
    """What a room leaves in Redis, and for how long."""

    @inlineCallbacks
    def room_keys(self, room):
        keys = yield self.redis.command("KEYS", "broadcaster:default:room:{{{}}}:*".format(room))
        return sorted(keys)

    @inlineCallbacks
    def test_room_keys_expire_after_the_last_use(self):
        """Joining a room and writing to it give its keys --room-ttl to
        live, renewed by each use; asking about a room one is not in
        creates no key at all."""
        node, port = yield start_node(self, self.redis, "alpha", "--room-ttl", "600")
        ann, _ = yield join_chat(self, port, "ann")
        ann.send_json({"type": "join", "room": "dev"})
        yield read_until(ann, of_type("presence", room="dev"))
        self.assertEqual(
            (yield self.room_keys("dev")),
            ["broadcaster:default:room:{dev}:epoch", "broadcaster:default:room:{dev}:seq"],
        )
        ann.send_json({"type": "message", "room": "dev", "text": "kept a while"})
        yield messages_until(ann, "kept a while")
        for key in (yield self.room_keys("dev")):
            ttl = yield self.redis.command("PTTL", key)
            self.assertTrue(590_000 < ttl <= 600_000, (key, ttl))
        for i in range(20):
            ann.send_json({"type": "who", "room": "probe-{}".format(i), "ref": i})
        errors = yield read_until(ann, of_type("error", ref=19))
        self.assertEqual(len([e for e in errors if e["type"] == "error"]), 20)
        self.assertEqual((yield self.room_keys("probe-*")), [])

    @inlineCallbacks
    def test_room_ttl_zero_keeps_rooms(self):
        node, port = yield start_node(self, self.redis, "alpha", "--room-ttl", "0")
        ann, _ = yield join_chat(self, port, "ann")
        ann.send_json({"type": "message", "text": "for ever"})
        yield messages_until(ann, "for ever")
        for key in (yield self.room_keys("lobby")):
            self.assertEqual((yield self.redis.command("PTTL", key)), -1, key)


class CrossNodeTests(RedisTestCase):
    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.a, self.port_a = yield start_node(self, self.redis, "alpha")
        self.b, self.port_b = yield start_node(self, self.redis, "beta")

    @inlineCallbacks
    def test_joins_and_messages_cross_nodes_once_and_in_order(self):
        """A join on one node is announced on the other, and 200 messages
        from node A reach B complete and in order and A exactly once, with
        consecutive seq numbers."""
        ann, ann_welcome = yield join_chat(self, self.port_a, "ann")
        yield wait_for(lambda: ann_welcome["id"] in ids(self.b.hub.presence("lobby")))
        bob, bob_welcome = yield join_chat(self, self.port_b, "bob")
        self.assertEqual(
            sorted((m["id"], m["name"]) for m in bob_welcome["members"]),
            [(ann_welcome["id"], "ann"), (bob_welcome["id"], "bob")],
        )
        joined = (yield read_until(ann, of_type("join", id=bob_welcome["id"])))[-1]
        self.assertEqual(joined["name"], "bob")
        texts = ["m{}".format(i) for i in range(200)] + ["end"]
        for text in texts:
            ann.send_json({"type": "message", "text": text})
        at_b = yield messages_until(bob, "end")
        at_a = yield messages_until(ann, "end")
        for received in (at_a, at_b):
            self.assertEqual([m["text"] for m in received], texts)
            seqs = [m["seq"] for m in received]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(texts))))
            self.assertEqual({m["epoch"] for m in received}, {at_a[0]["epoch"]})
        self.assertEqual(at_a, at_b)

    @inlineCallbacks
    def test_texts_of_one_turn_travel_as_one_batch(self):
        """150 messages published on node A in one reactor turn reach B in
        order, numbered 1 to 150, through three scripts (64 at most each);
        the history keeps each one, and recovery replays them."""
        ann, ann_welcome = yield join_chat(self, self.port_a, "ann")
        bob, _ = yield join_chat(self, self.port_b, "bob")
        yield wait_for(lambda: len(self.a.hub.presence("lobby")) == 2)
        before = yield self.redis.command("INFO", "commandstats")
        texts = ["t{}".format(i) for i in range(150)]
        acks = [self.a.hub.publish_text(ann_welcome["id"], text) for text in texts]
        got = yield messages_until(bob, "t149")
        self.assertEqual([(m["text"], m["seq"]) for m in got], list(zip(texts, range(1, 151))))
        answered = yield gatherResults(acks)
        self.assertEqual([message.seq for message in answered], list(range(1, 151)))
        after = yield self.redis.command("INFO", "commandstats")
        self.assertEqual(script_runs(after) - script_runs(before), 3)
        history = yield self.b.hub.backplane.history("lobby", 200)
        self.assertEqual([m.text for m in history], texts[-100:])
        carol, _ = yield join_chat(self, self.port_b, "carol")
        carol.send_json(
            {"type": "join", "room": "lobby", "since": {"epoch": got[0]["epoch"], "seq": 140}}
        )
        replayed = yield messages_until(carol, "t149")
        self.assertEqual([m["seq"] for m in replayed], list(range(141, 151)))

    @inlineCallbacks
    def test_presence_and_renames_cross_nodes(self):
        """who lists a room's members on both nodes; renames and leaves cross over."""
        ann, ann_welcome = yield join_chat(self, self.port_a, "ann")
        bob, bob_welcome = yield join_chat(self, self.port_b, "bob")
        for client in (ann, bob):
            client.send_json({"type": "join", "room": "dev"})
            yield read_until(client, of_type("presence", room="dev"))
        yield wait_for(lambda: len(self.a.hub.presence("dev")) == 2)
        ann.send_json({"type": "who", "room": "dev"})
        presence = (yield read_until(ann, of_type("presence", room="dev")))[-1]
        self.assertEqual(
            sorted(m["name"] for m in presence["members"]), ["ann", "bob"]
        )
        bob.send_json({"type": "hello", "name": "Robert"})
        rename = (yield read_until(ann, of_type("rename", room="dev")))[-1]
        self.assertEqual((rename["id"], rename["name"]), (bob_welcome["id"], "Robert"))
        bob.send_json({"type": "leave", "room": "dev"})
        left = (yield read_until(ann, of_type("leave", room="dev")))[-1]
        self.assertEqual(left["id"], bob_welcome["id"])
        ann.send_json({"type": "who", "room": "dev"})
        presence = (yield read_until(ann, of_type("presence", room="dev")))[-1]
        self.assertEqual([m["id"] for m in presence["members"]], [ann_welcome["id"]])

    @inlineCallbacks
    def test_binary_and_images_cross_nodes(self):
        """Binary messages and images from node A reach node B byte for byte."""
        ann, ann_welcome = yield join_chat(self, self.port_a, "ann")
        bob, _ = yield join_chat(self, self.port_b, "bob")
        yield wait_for(lambda: len(self.a.hub.presence("lobby")) == 2)
        data = b"\x00\xff 12 -\n\r\n" * 100
        ann.sendMessage(data, isBinary=True)
        header = (yield read_until(bob, of_type("binary")))[-1]
        self.assertEqual((header["from"], header["size"]), (ann_welcome["id"], len(data)))
        self.assertEqual((yield bob.next()), (data, True))
        out = io.BytesIO()
        Image.new("RGB", (5, 3), (10, 200, 30)).save(out, format="PNG")
        png = out.getvalue()
        self.a.hub.publish_image(ann_welcome["id"], png, 5, 3)
        header = (yield read_until(bob, of_type("image")))[-1]
        self.assertEqual(
            (header["from"], header["width"], header["height"], header["size"]),
            (ann_welcome["id"], 5, 3, len(png)),
        )
        self.assertEqual((yield bob.next()), (png, True))

    @inlineCallbacks
    def test_recovery_on_another_node(self):
        """A client that saw messages on node A, reconnecting to node B
        with since, gets exactly the ones it missed, complete."""
        talker, _ = yield join_chat(self, self.port_a, "talker")
        listener, _ = yield join_chat(self, self.port_a, "listener")
        witness, _ = yield join_chat(self, self.port_b, "witness")
        for i in range(5):
            talker.send_json({"type": "message", "text": "before {}".format(i)})
        seen = (yield messages_until(listener, "before 4"))[-1]
        yield close_client(listener)
        for i in range(3):
            talker.send_json({"type": "message", "text": "missed {}".format(i), "ref": i})
        yield read_until(talker, of_type("ack", ref=2))
        # Once B has delivered them, they are behind a newcomer's join.
        yield messages_until(witness, "missed 2")
        again = yield connect_client(
            self,
            self.port_b,
            json_mode=True,
            path="/?since={}:{}".format(seen["epoch"], seen["seq"]),
        )
        events = yield read_until(again, of_type("recovered"))
        replayed = [e for e in events if e["type"] == "message"]
        self.assertEqual([m["text"] for m in replayed], ["missed 0", "missed 1", "missed 2"])
        self.assertEqual([m["seq"] for m in replayed], [seen["seq"] + i for i in (1, 2, 3)])
        self.assertTrue(events[-1]["complete"])

    @inlineCallbacks
    def test_healthz_shows_the_backplane(self):
        """/healthz reports Redis, connected, the node, the node count and no password."""
        yield wait_for(lambda: self.a.hub.backplane.state()["nodes"] == 2, what="beta known")
        response = yield treq.get(
            "http://127.0.0.1:{}/healthz".format(self.port_a), persistent=False
        )
        body = yield response.text()
        self.assertNotIn(PASSWORD, body)
        health = json.loads(body)
        self.assertEqual(
            health["backplane"],
            {
                "kind": "redis",
                "connected": True,
                "url": "redis://:***@127.0.0.1:{}/0".format(self.redis.port),
                "node": "alpha",
                "nodes": 2,
                "namespace": "default",
            },
        )

    @inlineCallbacks
    def test_nodes_with_their_clients_and_heartbeats(self):
        """Each node lists every registered node with its clients in Redis
        and a heartbeat younger than --node-timeout; while Redis is down,
        only itself."""
        yield join_chat(self, self.port_a, "ann")
        yield join_chat(self, self.port_b, "bob")
        yield join_chat(self, self.port_b, "cy")
        listed = yield self.a.hub.backplane.nodes()
        self.assertEqual(
            [(n["node"], n["connections"], n["here"], n["alive"]) for n in listed],
            [("alpha", 1, True, True), ("beta", 2, False, True)],
        )
        for node in listed:
            self.assertTrue(0 <= node["heartbeat_age"] <= self.a.hub.backplane.node_timeout, node)
        yield self.redis.kill()
        yield wait_for(lambda: not self.a.hub.backplane.connected, what="alpha to see Redis gone")
        alone = yield self.a.hub.backplane.nodes()
        self.assertEqual(
            alone,
            [{"node": "alpha", "connections": 1, "heartbeat_age": None, "here": True, "alive": True}],
        )

    @inlineCallbacks
    def test_unix_socket(self):
        """A node connected through the Unix socket shares the rooms of the TCP ones."""
        c, port_c = yield start_node(
            self, self.redis, "gamma", url="unix:{}?password={}".format(self.redis.socket, PASSWORD)
        )
        self.assertEqual(c.hub.backplane.state()["url"], "unix:{}".format(self.redis.socket))
        ann, _ = yield join_chat(self, self.port_a, "ann")
        cy, _ = yield join_chat(self, port_c, "cy")
        yield wait_for(lambda: len(self.a.hub.presence("lobby")) == 2)
        cy.send_json({"type": "message", "text": "through the socket"})
        message = (yield read_until(ann, of_type("message")))[-1]
        self.assertEqual(message["text"], "through the socket")


class RoomChannelTests(RedisTestCase):
    """A node receives a room's messages only while it has members there,
    and a member joining a room its node did not receive misses nothing
    and gets nothing twice."""

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        flags = ["--rate", "0", "--history-size", "1000"]
        self.a, self.port_a = yield start_node(self, self.redis, "alpha", *flags)
        self.b, self.port_b = yield start_node(
            self, self.redis, "beta", "--room-grace", "0.2", *flags
        )

    @inlineCallbacks
    def receivers(self, room):
        """How many nodes receive ``room``'s channel, as Redis counts them."""
        reply = yield self.redis.command("PUBSUB", "SHARDNUMSUB", "broadcaster:default:room:{%s}" % room)
        return int(reply[1])

    join = staticmethod(join_room)

    @inlineCallbacks
    def test_only_nodes_with_members_receive_a_room(self):
        ann, _ = yield join_chat(self, self.port_a, "ann")
        bob, _ = yield join_chat(self, self.port_b, "bob")
        self.assertEqual((yield self.receivers("lobby")), 2)
        self.assertEqual((yield self.receivers("dev")), 0)
        yield self.join(ann, "dev")
        self.assertEqual((yield self.receivers("dev")), 1)
        yield self.join(bob, "dev")
        self.assertEqual((yield self.receivers("dev")), 2)
        bob.send_json({"type": "leave", "room": "dev"})
        yield wait_for(
            lambda: not self.b.hub.backplane.rooms.received("dev"), what="beta dropping dev"
        )
        self.assertEqual((yield self.receivers("dev")), 1)
        # Messages in dev keep flowing to alpha's member.
        ann.send_json({"type": "message", "room": "dev", "text": "still here"})
        yield messages_until(ann, "still here")

    @inlineCallbacks
    def test_joining_while_messages_flow_misses_nothing(self):
        """Bob, on a node that stopped receiving dev, joins it again with
        since while 300 messages are being published on the other node:
        he gets every one after his position exactly once, and recovery is
        complete."""
        ann, _ = yield join_chat(self, self.port_a, "ann")
        bob, _ = yield join_chat(self, self.port_b, "bob")
        yield self.join(ann, "dev")
        seen = yield self.join(bob, "dev")
        bob.send_json({"type": "leave", "room": "dev"})
        yield wait_for(
            lambda: not self.b.hub.backplane.rooms.received("dev"), what="beta dropping dev"
        )
        texts = ["m{}".format(i) for i in range(300)]
        for text in texts[:100]:
            ann.send_json({"type": "message", "room": "dev", "text": text})
        bob.send_json(
            {"type": "join", "room": "dev", "since": {"epoch": seen["epoch"], "seq": seen["seq"]}}
        )
        for text in texts[100:]:
            ann.send_json({"type": "message", "room": "dev", "text": text})
        events = []
        while not (events and events[-1]["type"] == "recovered") or not any(
            e.get("text") == "m299" for e in events
        ):
            events.append((yield bob.next_json()))
        received = [e for e in events if e["type"] == "message"]
        got = [m["text"] for m in received]
        self.assertEqual(
            (len(got), sorted(set(texts) - set(got), key=lambda t: int(t[1:]))[:20]),
            (len(texts), []),
            [(e["type"], e.get("text"), e.get("seq")) for e in events][:400],
        )
        self.assertEqual(sorted(got), sorted(texts))
        self.assertEqual(len({m["seq"] for m in received}), len(texts))
        recovered = [e for e in events if e["type"] == "recovered"]
        self.assertEqual([r["complete"] for r in recovered], [True])

    @inlineCallbacks
    def test_publishing_where_the_node_has_nobody(self):
        """The server API on a node with no member in a room publishes to
        the members on the other node, once."""
        key = key_file(self)
        c, port_c = yield start_node(self, self.redis, "gamma", "--api-key-file", key)
        ann, _ = yield join_chat(self, self.port_a, "ann")
        yield self.join(ann, "ops")
        self.assertFalse(c.hub.backplane.rooms.received("ops"))
        for text in ("one", "two"):
            status, _, answer = yield publish(port_c, {"room": "ops", "text": text})
            self.assertEqual(status, 202, answer)
        received = yield messages_until(ann, "two")
        self.assertEqual([m["text"] for m in received], ["one", "two"])


class SentinelTests(RedisTestCase):
    """Nodes that find Redis through Sentinel follow a failover."""

    timeout = 180

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.replica = RedisServer(
            self, "--replicaof", "127.0.0.1", str(self.redis.port), "--masterauth", PASSWORD
        )
        yield self.replica.start()
        yield poll(
            lambda: self.replica.command("INFO", "replication").addCallback(
                lambda info: "master_link_status:up" in str(info)
            ),
            "the replica in sync",
        )
        self.sentinels = [Sentinel(self, self.redis) for _ in range(3)]
        for sentinel in self.sentinels:
            yield sentinel.start()
        for sentinel in self.sentinels:
            yield poll(
                lambda: sentinel.command("SENTINEL", "replicas", "mymaster"),
                "the sentinel to know the replica",
            )
        self.url = "redis+sentinel://:{}@{}/mymaster/0".format(
            PASSWORD, ",".join("127.0.0.1:{}".format(s.port) for s in self.sentinels)
        )

    @inlineCallbacks
    def test_a_failover_is_followed(self):
        """Two nodes chat through the master the sentinels name; the master
        is killed; the sentinels promote the replica, both nodes find it,
        and the chat goes on: nothing twice, the room's sequence kept."""
        a, port_a = yield start_node(self, None, "alpha", url=self.url)
        b, port_b = yield start_node(self, None, "beta", url=self.url)
        self.assertEqual(
            a.hub.backplane.state()["url"],
            "redis+sentinel://:***@{}/mymaster/0".format(
                ",".join("127.0.0.1:{}".format(s.port) for s in self.sentinels)
            ),
        )
        ann, _ = yield join_chat(self, port_a, "ann")
        bob, _ = yield join_chat(self, port_b, "bob")
        yield wait_for(lambda: len(b.hub.presence("lobby")) == 2, what="ann seen on beta")
        for i in range(5):
            ann.send_json({"type": "message", "text": "before {}".format(i), "ref": i})
        yield read_until(ann, of_type("ack", ref=4))
        before = yield messages_until(bob, "before 4")
        after = yield fail_over(self, self.redis, (a, b), ann, bob, "lobby")
        received = before + after
        self.assertEqual(len({(m["epoch"], m["seq"]) for m in received}), len(received))
        self.assertEqual([m["text"] for m in received][-1], "after")
        # The replica had the room's sequence: it goes on from there.
        self.assertEqual(after[-1]["epoch"], before[-1]["epoch"])
        self.assertGreater(after[-1]["seq"], before[-1]["seq"])


class ClusterTestCase(TestCase):
    """A real Redis Cluster of three masters (with ``replicas`` each),
    made with ``redis-cli --cluster create``; ``self.url`` is for nodes."""

    timeout = 120

    #: Replicas per master.
    replicas = 0

    @inlineCallbacks
    def setUp(self):
        require_redis_server()
        if not os.path.exists(REDIS_CLI):
            message = "redis-cli is not installed (apt-get install redis-tools)"
            if os.environ.get("CI"):
                raise FailTest("CI is set but " + message)
            raise SkipTest(message)
        self.servers = [
            RedisServer(
                self, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000", "--masterauth", PASSWORD,
                # Not the default port + 10000, which may be too high or taken.
                "--cluster-port", str(free_port()),
            )
            for _ in range(3 * (1 + self.replicas))
        ]
        for server in self.servers:
            yield server.start()
        self.masters = self.servers
        create = CollectingProcess()
        argv = [
            REDIS_CLI, "-a", PASSWORD, "--no-auth-warning", "--cluster", "create",
            *("127.0.0.1:{}".format(m.port) for m in self.servers),
            "--cluster-replicas", str(self.replicas), "--cluster-yes",
        ]
        reactor.spawnProcess(create, REDIS_CLI, argv, env=os.environ)
        out, err, status = yield create.ended()
        self.assertEqual(status, 0, (out, err))
        for master in self.servers:
            yield poll(
                lambda: master.command("CLUSTER", "INFO").addCallback(
                    lambda info: "cluster_state:ok" in str(info)
                ),
                "the cluster ready",
            )
        self.url = "redis+cluster://:{}@127.0.0.1:{}".format(PASSWORD, self.masters[0].port)


class ClusterTests(ClusterTestCase):
    """Two nodes on a real three-master Redis Cluster: rooms spread over
    the masters' slots, one order per room, exactly once, recovery across
    nodes, presence."""

    @inlineCallbacks
    def test_rooms_on_every_master(self):
        from broadcaster.redis.cluster import SlotMap, key_slot

        a, port_a = yield start_node(self, None, "alpha", url=self.url)
        b, port_b = yield start_node(self, None, "beta", url=self.url)
        rooms = ["room-{}".format(i) for i in range(6)]
        slots = SlotMap.from_reply((yield self.masters[0].command("CLUSTER", "SLOTS")))
        owners = {slots.owner("{%s}" % room) for room in rooms}
        self.assertEqual(len(owners), 3, "the rooms should spread over the three masters")
        ann, _ = yield join_chat(self, port_a, "ann")
        bob, _ = yield join_chat(self, port_b, "bob")
        for client in (ann, bob):
            for room in rooms:
                client.send_json({"type": "join", "room": room})
                yield read_until(client, of_type("presence", room=room))
        yield wait_for(
            lambda: all(len(a.hub.presence(room)) == 2 for room in rooms), what="bob seen on alpha"
        )
        for i in range(10):
            for room in rooms:
                ann.send_json({"type": "message", "room": room, "text": "{} {}".format(room, i)})
        got = {}
        while sum(len(v) for v in got.values()) < 60:
            event = yield bob.next_json(timeout=30)
            if event["type"] == "message":
                got.setdefault(event["room"], []).append(event)
        for room in rooms:
            self.assertEqual(
                [m["text"] for m in got[room]], ["{} {}".format(room, i) for i in range(10)]
            )
            seqs = [m["seq"] for m in got[room]]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + 10)))
        # Recovery on the other node, from Redis's history.
        last = got["room-3"][4]
        again = yield connect_client(self, port_a, json_mode=True)
        yield again.next_json()
        again.send_json({
            "type": "join", "room": "room-3",
            "since": {"epoch": last["epoch"], "seq": last["seq"]},
        })
        events = yield read_until(again, of_type("recovered", room="room-3"))
        self.assertEqual(
            [e["text"] for e in events if e["type"] == "message"],
            ["room-3 {}".format(i) for i in range(5, 10)],
        )
        self.assertTrue(events[-1]["complete"])
        self.assertEqual(key_slot("{room-3}"), key_slot(b"broadcaster:default:room:{room-3}:seq"))


class ClusterFailoverTests(ClusterTestCase):
    """A master of the cluster killed: its replica takes over, the nodes
    follow, and the room on its slots goes on, nothing twice."""

    replicas = 1

    @inlineCallbacks
    def test_a_failover_is_followed(self):
        from broadcaster.redis.cluster import SlotMap

        a, port_a = yield start_node(self, None, "alpha", url=self.url)
        b, port_b = yield start_node(self, None, "beta", url=self.url)
        ann, _ = yield join_chat(self, port_a, "ann")
        bob, _ = yield join_chat(self, port_b, "bob")
        for client in (ann, bob):
            client.send_json({"type": "join", "room": "dev"})
            yield read_until(client, of_type("presence", room="dev"))
        for i in range(3):
            ann.send_json({"type": "message", "room": "dev", "text": "before {}".format(i)})
        before = yield messages_until(bob, "before 2")
        slots = SlotMap.from_reply((yield self.servers[0].command("CLUSTER", "SLOTS")))
        owner = slots.owner("{dev}")
        victim = next(s for s in self.servers if s.port == owner[1])
        after = yield fail_over(self, victim, (a, b), ann, bob, "dev")
        received = before + after
        self.assertEqual(len({(m["epoch"], m["seq"]) for m in received}), len(received))
        self.assertEqual(after[-1]["epoch"], before[-1]["epoch"])
        self.assertGreater(after[-1]["seq"], before[-1]["seq"])


class SignedInNodesTestCase(RedisTestCase):
    """Nodes alpha and beta sharing Redis, taking signed tokens and API keys."""

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write(SECRET + "\n")
        flags = ["--api-key-file", key_file(self), "--jwt-secret-file", secret]
        self.a, self.port_a = yield start_node(self, self.redis, "alpha", *flags)
        self.b, self.port_b = yield start_node(self, self.redis, "beta", *flags)


class ServerAPITests(SignedInNodesTestCase):
    """The server API on nodes sharing Redis."""

    @inlineCallbacks
    def test_disconnect_on_one_node_closes_the_user_on_another(self):
        """/api/disconnect on node A closes the user's connection on node B
        with 4003 and the reason, and both nodes refuse its return while
        banned; another user on B stays and hears only that it left."""
        ann, ann_id = yield sign_in(self, self.port_b, "u-ann")
        bob, _ = yield sign_in(self, self.port_b, "u-bob")
        yield wait_for(lambda: "u-ann" in users(self.a.hub.presence("lobby")), what="ann on A")
        status, _, answer = yield disconnect(
            self.port_a, {"user": "u-ann", "reason": "spam", "ban_seconds": 600}
        )
        self.assertEqual((status, answer), (200, {"disconnected": 0}))
        self.assertEqual((yield ann.closed), (True, 4003, "spam"))
        for port in (self.port_a, self.port_b):
            self.assertIn("403", (yield refusal(port, token_path("u-ann"))))
        bob.send_json({"type": "message", "text": "after"})
        events = yield read_until(bob, of_type("message", text="after"))
        self.assertLessEqual({e["type"] for e in events}, {"join", "leave", "message"})
        self.assertIn(ann_id, [e["id"] for e in events if e["type"] == "leave"])
        self.assertFalse(bob.closed.called)

    @inlineCallbacks
    def test_rooms_are_read_across_nodes_without_creating_keys(self):
        """Presence on A lists B's members; history on A has what was said
        on B; asking about an unknown room creates no key."""
        ann, ann_id = yield sign_in(self, self.port_b, "u-ann")
        ann.send_json({"type": "join", "room": "dev"})
        ann.send_json({"type": "message", "room": "dev", "text": "hello", "ref": 1})
        yield read_until(ann, of_type("ack", ref=1))
        yield wait_for(lambda: len(self.a.hub.presence("dev")) == 1, what="ann in dev on A")
        status, _, presence = yield api_request(self.port_a, "rooms/dev/presence")
        self.assertEqual((status, presence["count"]), (200, 1))
        self.assertEqual(presence["members"], [{"user": "u-ann", "name": None, "connections": 1}])
        status, _, history = yield api_request(self.port_a, "rooms/dev/history", key=KEY)
        self.assertEqual([m["text"] for m in history["messages"]], ["hello"])
        for what in ("presence", "history", "history?before=3"):
            status, _, _ = yield api_request(self.port_a, "rooms/nowhere/" + what)
            self.assertEqual(status, 200)
        keys = yield self.redis.command("KEYS", "broadcaster:default:room:{nowhere}*")
        self.assertEqual(keys, [])


class UserPresenceTests(SignedInNodesTestCase):
    """One presence per user, across nodes: a user with a connection on
    each node is one member of the room, announced once when it arrives
    and once when it has gone."""

    def ann_on(self, node):
        return lambda: users(node.hub.presence("lobby")).get("u-ann", 0)

    @inlineCallbacks
    def test_two_connections_on_two_nodes_are_one_member(self):
        watcher, _ = yield sign_in(self, self.port_b, "u-watch")
        first, first_id = yield sign_in(self, self.port_a, "u-ann")
        yield wait_for(lambda: self.ann_on(self.b)() == 1, what="ann's first tab on B")
        second = yield connect_client(self, self.port_b, json_mode=True, path=token_path("u-ann"))
        welcome = yield second.next_json()
        ann = [m for m in welcome["members"] if m.get("user") == "u-ann"]
        self.assertEqual(ann, [{"user": "u-ann", "name": None, "connections": 2}])
        self.assertEqual(welcome["count"], 2)
        yield wait_for(lambda: self.ann_on(self.a)() == 2, what="both tabs known on A")

        watcher.send_json({"type": "who", "ref": "who"})
        events = yield read_until(watcher, of_type("presence"))
        presence = events[-1]
        self.assertEqual(presence["count"], 2)
        self.assertIn({"user": "u-ann", "name": None, "connections": 2}, presence["members"])

        yield close_client(first)
        yield wait_for(lambda: self.ann_on(self.b)() == 1, what="the first tab gone on B")
        watcher.send_json({"type": "message", "text": "still here?"})
        events += yield read_until(watcher, of_type("message", text="still here?"))
        yield close_client(second)
        events += yield read_until(watcher, of_type("leave", user="u-ann"))
        told = [(e["type"], e["id"], e["connections"]) for e in events if e.get("user") == "u-ann"]
        # Joined with its tab on A, left with its tab on B: one member.
        self.assertEqual(told, [("join", first_id, 1), ("leave", welcome["id"], 0)])
        yield wait_for(lambda: self.ann_on(self.a)() == 0, what="ann gone on A")


class OutageTests(RedisTestCase):
    def outage_events(self, log, node):
        return [
            e
            for e in log
            if e.get("node") == node and "unavailable" in e.get("log_format", "")
            and "serving {scope} locally" in e.get("log_format", "")
            and e.get("scope") == "this node's clients"
        ]

    def back_events(self, log, node):
        return [
            e
            for e in log
            if e.get("node") == node and "Redis back after" in e.get("log_format", "")
        ]

    @inlineCallbacks
    def chatting_across(self):
        """
        Nodes alpha and beta with ann on alpha and bob on beta, once a
        message has crossed.

        :return: ``(a, b, ann, ann_welcome, bob)``.
        """
        a, port_a = yield start_node(self, self.redis, "alpha")
        b, port_b = yield start_node(self, self.redis, "beta")
        ann, ann_welcome = yield join_chat(self, port_a, "ann")
        bob, _ = yield join_chat(self, port_b, "bob")
        yield wait_for(lambda: len(a.hub.presence("lobby")) == 2)
        ann.send_json({"type": "message", "text": "before"})
        yield messages_until(bob, "before")
        return a, b, ann, ann_welcome, bob

    @inlineCallbacks
    def test_redis_killed_and_restarted_mid_stream(self):
        """While Redis is down each node delivers its own clients' messages
        exactly once; after it restarts messages cross nodes again; each
        node logs the outage once and how many messages stayed local."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a, b, ann, ann_welcome, bob = yield self.chatting_across()

        # Mid-stream: Redis dies once the tenth is through, while the
        # others go on, one per reactor turn.
        in_flight = ["in flight {}".format(i) for i in range(50)]
        acks, killed = [], []
        for text in in_flight:
            acks.append(a.hub.publish_text(ann_welcome["id"], text))
            if len(acks) == 10:

                def kill(event):
                    killed.append(self.redis.kill())
                    return event

                acks[-1].addCallback(kill)
            yield deferLater(reactor, 0, lambda: None)
        yield wait_for(lambda: killed, what="the kill")
        yield killed[0]
        yield wait_for(
            lambda: not a.hub.backplane.connected and not b.hub.backplane.connected,
            what="both nodes notice",
        )

        during_a = ["alone on A {}".format(i) for i in range(5)]
        during_b = ["alone on B {}".format(i) for i in range(3)]
        for text in during_a:
            ann.send_json({"type": "message", "text": text})
        for text in during_b:
            bob.send_json({"type": "message", "text": text})
        at_a = yield messages_until(ann, during_a[-1])
        self.assertEqual([m["text"] for m in at_a], ["before"] + in_flight + during_a)
        self.assertTrue(all(m["epoch"].startswith("local-alpha-") for m in at_a[-5:]))
        at_b_during = yield messages_until(bob, during_b[-1])
        # Every publication was answered, through Redis or locally.
        self.assertEqual([ack.result.text for ack in acks], in_flight)

        yield self.redis.start()
        yield wait_for(
            lambda: a.hub.backplane.connected and b.hub.backplane.connected,
            timeout=30,
            what="both nodes back in Redis",
        )
        ann.send_json({"type": "message", "text": "after"})
        at_b_after = yield messages_until(bob, "after")
        at_a_after = yield messages_until(ann, "after")
        self.assertEqual([m["text"] for m in at_a_after], ["after"])

        # B got a prefix of the in-flight ones (those Redis published
        # before it died), its own, and nothing of A's outage.
        seen_by_b = [m["text"] for m in at_b_during + at_b_after]
        crossed = [t for t in seen_by_b if t.startswith("in flight")]
        self.assertEqual(crossed, in_flight[: len(crossed)])
        self.assertEqual(
            [t for t in seen_by_b if not t.startswith("in flight")], during_b + ["after"]
        )

        for node in ("alpha", "beta"):
            self.assertEqual(len(self.outage_events(log, node)), 1, node)
            self.assertEqual(len(self.back_events(log, node)), 1, node)
        self.assertEqual(self.back_events(log, "beta")[0]["count"], 3)
        self.assertGreaterEqual(self.back_events(log, "alpha")[0]["count"], 5)
        self.assertEqual(a.hub.backplane.state()["nodes"], 2)

    @inlineCallbacks
    def test_scripts_flushed_under_a_node(self):
        """SCRIPT FLUSH makes the next publication fail: the node logs it,
        delivers that message to its own clients, reconnects, and messages
        cross nodes again."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a, _, ann, _, bob = yield self.chatting_across()

        yield self.redis.command("SCRIPT", "FLUSH")
        ann.send_json({"type": "message", "text": "unknown script"})
        at_a = yield messages_until(ann, "unknown script")
        self.assertEqual([m["text"] for m in at_a], ["before", "unknown script"])
        self.assertTrue(
            [e for e in log if "SCRIPT FLUSH" in e.get("log_format", "")], "not logged"
        )
        yield wait_for(lambda: a.hub.backplane.connected, timeout=30, what="alpha back in Redis")
        ann.send_json({"type": "message", "text": "after"})
        at_b = yield messages_until(bob, "after")
        self.assertEqual([m["text"] for m in at_b], ["after"])

    @inlineCallbacks
    def test_starts_and_serves_without_redis(self):
        """With Redis down at start-up the server still serves its own
        clients, says so once (and in /healthz, with what it delivered
        locally), and joins Redis when it comes."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        yield self.redis.kill()
        a, port_a = yield start_server(self, ["--redis", self.redis.url, "--node-id", "alpha"])
        ann, welcome = yield join_chat(self, port_a, "ann")
        self.assertTrue(welcome["epoch"].startswith("local-alpha-"))
        ann.send_json({"type": "message", "text": "anyone?"})
        self.assertEqual((yield messages_until(ann, "anyone?"))[0]["seq"], 1)
        yield wait_for(lambda: self.outage_events(log, "alpha"), what="the outage logged")
        response = yield treq.get("http://127.0.0.1:{}/healthz".format(port_a), persistent=False)
        backplane = json.loads((yield response.text()))["backplane"]
        self.assertEqual((backplane["connected"], backplane["local_only"]), (False, 1))
        self.assertGreaterEqual(backplane["down_for"], 0)
        yield self.redis.start()
        yield wait_for(lambda: a.hub.backplane.connected, timeout=30, what="connected")
        self.assertEqual(self.back_events(log, "alpha")[0]["count"], 1)
        self.assertEqual(len(self.outage_events(log, "alpha")), 1)


    @inlineCallbacks
    def test_wrong_password(self):
        """A wrong password is logged and the server serves its own clients."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        url = "redis://:wrong@127.0.0.1:{}/0".format(self.redis.port)
        a, port_a = yield start_server(self, ["--redis", url, "--node-id", "alpha"])
        yield wait_for(
            lambda: [e for e in log if "giving up on Redis" in e.get("log_format", "")],
            what="the refusal logged",
        )
        ann, _ = yield join_chat(self, port_a, "ann")
        ann.send_json({"type": "message", "text": "still here"})
        yield messages_until(ann, "still here")
        self.assertFalse(a.hub.backplane.connected)


class NodeDeathTests(RedisTestCase):
    @inlineCallbacks
    def start_twistd_node(self, node, *args):
        """
        Run ``twistd broadcaster --redis`` as node ``node`` in a process of
        its own.
        """
        process, port = yield start_twistd(
            self, ["--redis", self.redis.url, "--node-id", node, *args]
        )
        # It listens before it has joined Redis (start-up does not wait).
        deadline = reactor.seconds() + 30
        while True:
            response = yield treq.get(
                "http://127.0.0.1:{}/healthz".format(port), persistent=False
            )
            health = yield response.json()
            if health["backplane"]["connected"]:
                break
            if reactor.seconds() > deadline:
                raise FailTest("node {} did not join Redis: {}".format(node, health))
            yield deferLater(reactor, 0.01, lambda: None)
        return process, port

    @inlineCallbacks
    def test_a_dead_node_s_clients_are_announced_as_gone(self):
        """When a node dies without a word (SIGKILL), the other node
        announces its clients as gone once --node-timeout has passed."""
        timeout = 1.5
        b, port_b = yield start_node(self, self.redis, "beta", "--node-timeout", str(timeout))
        process, port_a = yield self.start_twistd_node("alpha", "--node-timeout", str(timeout))
        bob, bob_welcome = yield join_chat(self, port_b, "bob")
        ann, ann_welcome = yield join_chat(self, port_a, "ann")
        yield read_until(bob, of_type("join", id=ann_welcome["id"]))
        killed_at = reactor.seconds()
        process.transport.signalProcess(signal.SIGKILL)
        left = (yield read_until(bob, of_type("leave", id=ann_welcome["id"])))[-1]
        elapsed = reactor.seconds() - killed_at
        # Its key expires at most node-timeout after its last heartbeat,
        # and B looks every node-timeout / 3.
        self.assertLess(elapsed, timeout * 4 / 3 + 1.0)
        self.assertEqual((left["room"], left["name"]), ("lobby", "ann"))
        self.assertEqual(ids(b.hub.presence("lobby")), {bob_welcome["id"]})
        self.assertEqual(b.hub.backplane.state()["nodes"], 1)

    @inlineCallbacks
    def test_sigterm_drains_clients_before_leaving_redis(self):
        """SIGTERM on a twistd node: its clients are drained first (a client
        that never answers the close is waited for, --drain-timeout), and
        only then does the node leave Redis; a client on another node hears
        of its clients' departure no earlier than the drain's end."""
        process, port_a = yield start_twistd(
            self, ["--redis", self.redis.url, "--node-id", "alpha", "--drain-timeout", "2"]
        )
        b, port_b = yield start_node(self, self.redis, "beta")
        bob, _ = yield join_chat(self, port_b, "bob")
        frozen = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port_a).connect(
            Factory.forProtocol(StalledReader)
        )
        self.addCleanup(frozen.transport.abortConnection)
        yield wait_for(lambda: len(b.hub.presence("lobby")) == 2, what="alpha's client on beta")
        started = reactor.seconds()
        process.transport.signalProcess(signal.SIGTERM)
        yield read_until(bob, of_type("leave"), limit=10)
        self.assertGreaterEqual(reactor.seconds() - started, 1.5)
        out, err, status = yield process.ended()
        self.assertEqual(status, 0, out + err)
        drained = out.index("did not close within 2 s; dropping them")
        left = out.index("node alpha left Redis")
        self.assertLess(drained, left)

    @inlineCallbacks
    def test_a_stopping_node_says_goodbye(self):
        """A node that stops cleanly has its clients announced as gone at once."""
        a, port_a = yield start_node(self, self.redis, "alpha")
        b, port_b = yield start_node(self, self.redis, "beta")
        bob, _ = yield join_chat(self, port_b, "bob")
        ann, ann_welcome = yield join_chat(self, port_a, "ann")
        yield read_until(bob, of_type("join", id=ann_welcome["id"]))
        yield a.stopService()
        left = (yield read_until(bob, of_type("leave", id=ann_welcome["id"]), limit=10))[-1]
        self.assertEqual(left["room"], "lobby")
        self.assertEqual(b.hub.backplane.state()["nodes"], 1)

