"""
Rooms spread over several standalone Redis servers (``--redis`` repeated):
the ring that picks each room's server, and two real redis-servers under
two nodes, one of them killed.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.python.usage import UsageError

from broadcaster.redis.address import parse_redis_url
from broadcaster.redis.ring import Ring
from tests.redis.test_redis import (
    PASSWORD,
    join_room,
    messages_until,
    redis_servers,
    start_node,
)
from tests.http.test_metrics import scrape
from tests.support import server_options, wait_for
from tests.test_rooms import join_chat

ROOMS = ["room-{}".format(i) for i in range(3000)]


class RingTests(SynchronousTestCase):
    """Which server holds a room: by its name, evenly, stable as servers
    are added."""

    def test_the_order_servers_are_given_in_does_not_matter(self):
        one = Ring([("a:6379/0", "a"), ("b:6379/0", "b"), ("c:6379/0", "c")])
        other = Ring([("c:6379/0", "c"), ("a:6379/0", "a"), ("b:6379/0", "b")])
        self.assertEqual([one.shard(r) for r in ROOMS], [other.shard(r) for r in ROOMS])

    def test_rooms_are_spread_evenly(self):
        ring = Ring([("a:6379/0", "a"), ("b:6379/0", "b"), ("c:6379/0", "c")])
        counts = {name: 0 for name in "abc"}
        for room in ROOMS:
            counts[ring.shard(room)] += 1
        for name, count in counts.items():
            # An even share is 1000; 160 points each keep it within 20%.
            self.assertTrue(800 <= count <= 1200, counts)

    def test_a_server_added_takes_rooms_from_the_others_and_moves_no_other(self):
        two = Ring([("a:6379/0", "a"), ("b:6379/0", "b")])
        three = Ring([("a:6379/0", "a"), ("b:6379/0", "b"), ("c:6379/0", "c")])
        moved = [room for room in ROOMS if two.shard(room) != three.shard(room)]
        self.assertEqual({three.shard(room) for room in moved}, {"c"})
        # About a third of the rooms, and no more.
        self.assertTrue(800 <= len(moved) <= 1200, len(moved))

    def test_the_same_server_twice_is_refused(self):
        with self.assertRaises(ValueError):
            Ring([("a:6379/0", "a"), ("a:6379/0", "b")])
        with self.assertRaises(UsageError) as raised:
            server_options(
                ["--redis", "redis://127.0.0.1:7000/0", "--redis", "redis://:pw@127.0.0.1:7000"]
            )
        self.assertIn("given twice", str(raised.exception))
        self.assertNotIn("pw", str(raised.exception))

    def test_a_cluster_is_given_alone(self):
        with self.assertRaises(UsageError) as raised:
            server_options(
                ["--redis", "redis+cluster://127.0.0.1:7000", "--redis", "redis://127.0.0.1:7001"]
            )
        self.assertIn("only --redis", str(raised.exception))

    def test_a_control_message_through_every_server_is_carried_out_once(self):
        """The shards of one node's servers remember the control
        messages' ids together: the copy through the second is skipped."""
        from broadcaster.redis.shards import sharded

        class Made:
            def __init__(self, address, shard):
                self.shard = shard
                for name in ("history_size", "node_timeout", "batch_delay", "namespace"):
                    setattr(self, name, 0)
                self.memory = shard.memory

        addresses = [parse_redis_url("redis://127.0.0.1:{}/0".format(port)) for port in (7000, 7001)]
        backplane = sharded(addresses, Made, Clock(), 1024)
        first, second = (made.shard for made in backplane.shards)
        self.assertTrue(first.first_time("x1"))
        self.assertFalse(second.first_time("x1"))
        self.assertTrue(second.first_time("x2"))
        self.assertEqual(
            {backplane.shard_of(room).shard.index for room in ROOMS[:50]}, {0, 1}
        )
        for room in ROOMS[:200]:
            owner = backplane.shard_of(room).shard
            self.assertTrue(owner.owns(room))
            self.assertFalse((second if owner is first else first).owns(room))

    def test_servers_are_named_by_where_they_are(self):
        self.assertEqual(parse_redis_url("redis://:secret@10.0.0.5:7000/2").shard_name(), "10.0.0.5:7000/2")
        self.assertEqual(parse_redis_url("unix:/run/redis.sock?db=1").shard_name(), "unix:/run/redis.sock/1")
        self.assertEqual(
            parse_redis_url("redis+sentinel://s1:26379,s2:26379/main/3").shard_name(), "sentinel:main/3"
        )


def rooms_on(servers, index, count):
    """
    ``count`` room names the ring of ``servers`` gives to ``servers[index]``.
    """
    ring = Ring([(parse_redis_url(s.url).shard_name(), i) for i, s in enumerate(servers)])
    return [room for room in ROOMS if ring.shard(room) == index][:count]


class ShardedNodesTests(TestCase):
    """Two nodes over two standalone redis-servers."""

    timeout = 120

    @inlineCallbacks
    def setUp(self):
        self.servers = yield redis_servers(self, 2)
        first, second = (server.url for server in self.servers)
        flags = ["--redis", second, "--rate", "0", "--room-grace", "0.2"]
        self.a, self.port_a = yield start_node(self, None, "alpha", *flags, url=first)
        self.b, self.port_b = yield start_node(self, None, "beta", *flags, url=first)

    join = staticmethod(join_room)

    @inlineCallbacks
    def keys_on(self, server):
        keys = yield server.command("KEYS", "broadcaster:default:room:*")
        return {key.split("{", 1)[1].split("}", 1)[0] for key in keys}

    @inlineCallbacks
    def test_each_room_lives_on_the_server_its_name_hashes_to(self):
        """Messages in rooms of both servers cross nodes once and in order;
        each room's keys are on its server only, and so is its channel's
        subscription; presence crosses too."""
        first, second = rooms_on(self.servers, 0, 3), rooms_on(self.servers, 1, 3)
        ann, _ = yield join_chat(self, self.port_a, "ann")
        bob, _ = yield join_chat(self, self.port_b, "bob")
        for room in first + second:
            yield self.join(ann, room)
            yield self.join(bob, room)
            yield wait_for(lambda: len(self.a.hub.presence(room)) == 2, what="bob in " + room)
        for room in first + second:
            for i in range(5):
                ann.send_json({"type": "message", "room": room, "text": "{} {}".format(room, i)})
        # One order per room; rooms of two servers are not ordered together.
        got = []
        while len(got) < 5 * len(first + second):
            event = yield bob.next_json()
            if event["type"] == "message":
                got.append(event)
        for room in first + second:
            self.assertEqual(
                [(m["text"], m["seq"]) for m in got if m["room"] == room],
                [("{} {}".format(room, i), i + 1) for i in range(5)],
            )
        on_first = yield self.keys_on(self.servers[0])
        on_second = yield self.keys_on(self.servers[1])
        self.assertTrue(set(first) <= on_first and not set(second) & on_first, on_first)
        self.assertTrue(set(second) <= on_second and not set(first) & on_second, on_second)
        for server, rooms in ((self.servers[0], first), (self.servers[1], second)):
            for room in rooms:
                reply = yield server.command(
                    "PUBSUB", "SHARDNUMSUB", "broadcaster:default:room:{%s}" % room
                )
                self.assertEqual(int(reply[1]), 2, room)

    @inlineCallbacks
    def test_one_server_down_stops_only_its_rooms(self):
        """With one server killed, its room is served on each node alone
        (and recovers incomplete), while the other server's room goes on
        crossing nodes, and recovers complete; once the server is back,
        its room crosses nodes again."""
        down, up = rooms_on(self.servers, 0, 1)[0], rooms_on(self.servers, 1, 1)[0]
        ann, _ = yield join_chat(self, self.port_a, "ann")
        bob, _ = yield join_chat(self, self.port_b, "bob")
        for room in (down, up):
            yield self.join(ann, room)
            yield self.join(bob, room)
        ann.send_json({"type": "message", "room": down, "text": "before"})
        before = (yield messages_until(bob, "before"))[-1]

        yield self.servers[0].kill()
        for node in (self.a, self.b):
            yield wait_for(
                lambda: not node.hub.backplane.shard_of(down).connected, what="the outage seen"
            )
            self.assertTrue(node.hub.backplane.shard_of(up).connected)

        # The room of the server that is up crosses nodes, numbered in Redis.
        for i in range(3):
            ann.send_json({"type": "message", "room": up, "text": "up {}".format(i)})
        crossed = yield messages_until(bob, "up 2")
        self.assertEqual([m["text"] for m in crossed if m["room"] == up], ["up 0", "up 1", "up 2"])
        self.assertFalse(any(m["epoch"].startswith("local-") for m in crossed))
        # The other is delivered to ann's node only, in a local epoch.
        ann.send_json({"type": "message", "room": down, "text": "alone"})
        alone = (yield messages_until(ann, "alone"))[-1]
        self.assertTrue(alone["epoch"].startswith("local-alpha"), alone)
        bob.send_json({"type": "message", "room": up, "text": "marker"})
        late = yield messages_until(bob, "marker")
        self.assertNotIn("alone", [m["text"] for m in late])

        # Recovering on bob's node: complete in the room that is up,
        # incomplete in the one that is not.
        carol, _ = yield join_chat(self, self.port_b, "carol")
        for room, since in (
            (up, {"epoch": crossed[0]["epoch"], "seq": 0}),
            (down, {"epoch": before["epoch"], "seq": before["seq"]}),
        ):
            carol.send_json({"type": "join", "room": room, "since": since})
        recovered = {}
        while len(recovered) < 2:
            event = yield carol.next_json()
            if event["type"] == "recovered":
                recovered[event["room"]] = event["complete"]
        self.assertEqual(recovered, {up: True, down: False})

        state = self.a.hub.backplane.state()
        self.assertEqual(
            [s["connected"] for s in state["shards"]], [False, True], state
        )
        self.assertFalse(state["connected"])
        samples = yield scrape(self.port_a)
        self.assertEqual(
            [samples[("broadcaster_redis_connected", (("server", s["url"]),))] for s in state["shards"]],
            [0, 1],
        )
        self.assertEqual(samples[("broadcaster_backplane_connected", (("kind", "redis"),))], 0)

        yield self.servers[0].start()
        for node in (self.a, self.b):
            yield wait_for(lambda: node.hub.backplane.connected, timeout=30, what="back")
        ann.send_json({"type": "message", "room": down, "text": "after"})
        after = yield messages_until(bob, "after")
        self.assertEqual([m["text"] for m in after if m["room"] == down], ["after"])
        # Registering again, each node told the returning server of its
        # clients in that server's rooms only: nobody is listed twice.
        for room in (down, up, "lobby"):
            self.assertEqual(
                sorted(seat.name for seat in self.a.hub.presence(room)),
                ["ann", "bob", "carol"],
                room,
            )
        # The lobby is received from its own server only.
        lobby = "broadcaster:default:room:{lobby}"
        counts = []
        for server in self.servers:
            counts.append(int((yield server.command("PUBSUB", "SHARDNUMSUB", lobby))[1]))
        self.assertEqual(sorted(counts), [0, 2])

    @inlineCallbacks
    def test_a_node_given_other_servers_is_named(self):
        """A node started with only one of the two servers would keep
        some rooms where the others do not look: the others log it, once,
        naming it and both lists, without passwords."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        yield start_node(self, self.servers[0], "gamma")
        told = yield wait_for(
            lambda: [e for e in log if "other --redis servers" in e.get("log_format", "")
                     and e.get("node") == "alpha"],
            what="alpha telling",
        )
        names = sorted(parse_redis_url(s.url).shard_name() for s in self.servers)
        self.assertEqual(
            (told[0]["other"], told[0]["theirs"], told[0]["ours"]),
            ("gamma", parse_redis_url(self.servers[0].url).shard_name(), ", ".join(names)),
        )
        self.assertNotIn(PASSWORD, formatEvent(told[0]))
