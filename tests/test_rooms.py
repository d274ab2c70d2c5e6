"""
Rooms, presence, names, acknowledgements, history and recovery in the JSON
protocol, end to end: a real server on a loopback port and real Autobahn
clients, disconnected for real.
"""

import websocket as websocket_client
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import connect_client, start_server


@inlineCallbacks
def join_chat(testcase, port, name=None, since=None):
    """
    Connect a JSON client (optionally named, optionally recovering the
    lobby) and read its welcome and, unless recovering, its own join.

    :return: ``(client, welcome)``.
    """
    query = []
    if name is not None:
        query.append("name=" + name)
    if since is not None:
        query.append("since={}:{}".format(*since))
    path = "/?" + "&".join(query) if query else "/"
    client = yield connect_client(testcase, port, json_mode=True, path=path)
    welcome = yield client.next_json()
    assert welcome["type"] == "welcome", welcome
    if since is None:
        # (With since, the replay comes first: the join is a live event.)
        joined = yield client.next_json()
        assert (joined["type"], joined["id"]) == ("join", welcome["id"]), joined
    return client, welcome


@inlineCallbacks
def read_until(client, predicate, limit=1000):
    """
    Read JSON events until one satisfies ``predicate``.

    :return: every event read, the matching one last.
    """
    events = []
    for _ in range(limit):
        event = yield client.next_json()
        events.append(event)
        if predicate(event):
            return events
    raise AssertionError("no matching event in {} events".format(limit))


def of_type(kind, **fields):
    return lambda e: e["type"] == kind and all(e.get(k) == v for k, v in fields.items())


@inlineCallbacks
def flood(client, rooms, count, size):
    """
    ``client`` joins ``rooms`` and says ``count`` messages of ``size``
    characters in each, round the rooms, as fast as it can.

    :return: ``(sent, acks)``: the texts by room, and the acks by their
        ``ref``, ``<room>/<n>``.
    """
    for room in rooms:
        client.send_json({"type": "join", "room": room})
        yield read_until(client, of_type("presence", room=room))
    sent = {room: [] for room in rooms}
    for n in range(count):
        for room in rooms:
            text = "{} {} ".format(room, n).ljust(size, "x")
            sent[room].append(text)
            client.send_json(
                {"type": "message", "room": room, "text": text, "ref": "{}/{}".format(room, n)}
            )
    last = "{}/{}".format(rooms[-1], count - 1)
    events = yield read_until(client, of_type("ack", ref=last), limit=5 * count * len(rooms))
    return sent, {e["ref"]: e for e in events if e["type"] == "ack"}


class RoomTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self, ["--history-size", "5"])

    @inlineCallbacks
    def test_rooms_are_isolated(self):
        """Messages and joins in a room reach its members and nobody else."""
        ann, _ = yield join_chat(self, self.port, "ann")
        bob, bob_welcome = yield join_chat(self, self.port, "bob")
        carl, _ = yield join_chat(self, self.port, "carl")
        for client in (ann, bob):
            client.send_json({"type": "join", "room": "dev"})
            yield read_until(client, of_type("presence", room="dev"))
        yield read_until(ann, of_type("join", room="dev", id=bob_welcome["id"]))
        ann.send_json({"type": "message", "room": "dev", "text": "dev only"})
        ann.send_json({"type": "message", "text": "for the lobby"})
        for client in (ann, bob):
            event = (yield read_until(client, of_type("message")))[-1]
            self.assertEqual((event["room"], event["text"]), ("dev", "dev only"))
        carl_saw = yield read_until(carl, of_type("message"))
        self.assertEqual(carl_saw[-1]["text"], "for the lobby")
        self.assertFalse([e for e in carl_saw if e.get("room") == "dev"])

    @inlineCallbacks
    def test_presence_after_joins_and_leaves(self):
        """who lists a room's members by id and name, as they come and go."""
        ann, ann_welcome = yield join_chat(self, self.port, "ann")
        bob, bob_welcome = yield join_chat(self, self.port, "bob")
        self.assertEqual(
            bob_welcome["members"],
            [{"id": ann_welcome["id"], "name": "ann"}, {"id": bob_welcome["id"], "name": "bob"}],
        )
        ann.send_json({"type": "join", "room": "dev"})
        presence = (yield read_until(ann, of_type("presence", room="dev")))[-1]
        self.assertEqual(presence["members"], [{"id": ann_welcome["id"], "name": "ann"}])
        bob.send_json({"type": "join", "room": "dev"})
        presence = (yield read_until(bob, of_type("presence", room="dev")))[-1]
        self.assertEqual([m["name"] for m in presence["members"]], ["ann", "bob"])
        yield read_until(ann, of_type("join", room="dev"))
        bob.send_json({"type": "leave", "room": "dev"})
        left = (yield read_until(ann, of_type("leave", room="dev")))[-1]
        self.assertEqual((left["id"], left["name"]), (bob_welcome["id"], "bob"))
        ann.send_json({"type": "who", "room": "dev"})
        presence = (yield read_until(ann, of_type("presence", room="dev")))[-1]
        self.assertEqual([m["name"] for m in presence["members"]], ["ann"])
        # Only members may ask.
        bob.send_json({"type": "who", "room": "dev", "ref": 3})
        error = (yield read_until(bob, of_type("error")))[-1]
        self.assertEqual((error["reason"], error["ref"]), ("not in room 'dev': join it first", 3))

    @inlineCallbacks
    def test_names_from_url_and_hello(self):
        """A name set with ?name= or hello appears in events; ids stay the key."""
        ann, ann_welcome = yield join_chat(self, self.port, "ann")
        self.assertEqual(ann_welcome["name"], "ann")
        bob, bob_welcome = yield join_chat(self, self.port)
        self.assertIsNone(bob_welcome["name"])
        bob.send_json({"type": "hello", "name": "  Bob  "})
        rename = (yield read_until(ann, of_type("rename")))[-1]
        self.assertEqual((rename["id"], rename["name"]), (bob_welcome["id"], "Bob"))
        bob.send_json({"type": "message", "text": "hi"})
        message = (yield read_until(ann, of_type("message")))[-1]
        self.assertEqual((message["from"], message["name"]), (bob_welcome["id"], "Bob"))
        bob.send_json({"type": "hello", "name": "bad\u0007name"})
        error = (yield read_until(bob, of_type("error")))[-1]
        self.assertIn("control", error["reason"])

    @inlineCallbacks
    def test_bad_name_in_url_is_refused_at_the_handshake(self):
        """A ?name= with control characters gets HTTP 400 with the reason."""

        def connect():
            return websocket_client.create_connection(
                "ws://127.0.0.1:{}/?name=ev%07il".format(self.port), timeout=10
            )

        error = yield self.assertFailure(
            deferToThread(connect), websocket_client.WebSocketBadStatusException
        )
        self.assertEqual(error.status_code, 400)

    @inlineCallbacks
    def test_ack_with_ref(self):
        """A message with a ref is acknowledged with its seq; a refused one
        gets an error carrying the same ref."""
        ann, _ = yield join_chat(self, self.port)
        ann.send_json({"type": "message", "text": "one", "ref": "m1"})
        ann.send_json({"type": "message", "text": "two", "ref": 2})
        events = yield read_until(ann, of_type("ack", ref=2))
        acks = [e for e in events if e["type"] == "ack"]
        self.assertEqual([(a["ref"], a["seq"]) for a in acks], [("m1", 1), (2, 2)])
        ann.send_json({"type": "message", "text": "x", "room": "elsewhere", "ref": "m3"})
        error = (yield read_until(ann, of_type("error")))[-1]
        self.assertEqual(error["ref"], "m3")
        self.assertIn("join it first", error["reason"])

    @inlineCallbacks
    def test_history_order_and_limit(self):
        """history answers the last limit messages, oldest first, at most history-size."""
        ann, _ = yield join_chat(self, self.port)
        for i in range(7):
            ann.send_json({"type": "message", "text": str(i), "ref": i})
        yield read_until(ann, of_type("ack", ref=6))
        ann.send_json({"type": "history", "limit": 3})
        history = (yield read_until(ann, of_type("history")))[-1]
        self.assertEqual([m["text"] for m in history["messages"]], ["4", "5", "6"])
        self.assertEqual([m["seq"] for m in history["messages"]], [5, 6, 7])
        ann.send_json({"type": "history", "limit": 50})
        history = (yield read_until(ann, of_type("history")))[-1]
        self.assertEqual([m["text"] for m in history["messages"]], list("23456"))

    @inlineCallbacks
    def test_rooms_per_client_are_limited(self):
        """Joining more rooms than --max-rooms-per-client allows gets an error."""
        _, port = yield start_server(self, ["--max-rooms-per-client", "2"])
        ann, _ = yield join_chat(self, port)
        ann.send_json({"type": "join", "room": "a"})
        ann.send_json({"type": "join", "room": "b", "ref": "too-many"})
        error = (yield read_until(ann, of_type("error")))[-1]
        self.assertEqual(error["ref"], "too-many")
        self.assertIn("2 rooms", error["reason"])


class RecoveryTests(TestCase):
    """A client loses its connection while others keep talking, and catches up."""

    @inlineCallbacks
    def talk(self, client, room, texts):
        """Send texts one per reactor turn, so they interleave with everything else."""
        for text in texts:
            client.send_json({"type": "message", "room": room, "text": text})
            yield deferLater(reactor, 0, lambda: None)

    @inlineCallbacks
    def test_recovery_after_a_real_disconnect(self):
        """Rejoining with since gets every missed message once, in order,
        while the talker never stops."""
        service, port = yield start_server(self)
        talker, _ = yield join_chat(self, port, "talker")
        talker.send_json({"type": "join", "room": "dev"})
        yield read_until(talker, of_type("presence"))
        listener, _ = yield join_chat(self, port, "listener")
        listener.send_json({"type": "join", "room": "dev"})
        yield read_until(listener, of_type("presence"))

        texts = [str(i) for i in range(300)]
        talking = self.talk(talker, "dev", texts)
        seen = []
        while len(seen) < 50:
            event = yield listener.next_json()
            if event["type"] == "message":
                seen.append(event)
        listener.transport.abortConnection()
        yield listener.closed

        last = seen[-1]
        again, _ = yield join_chat(self, port, "listener")
        again.send_json(
            {"type": "join", "room": "dev", "since": {"epoch": last["epoch"], "seq": last["seq"]}}
        )
        yield talking
        events = yield read_until(again, lambda e: e.get("text") == "299")
        messages = [e for e in events if e["type"] == "message" and e["room"] == "dev"]
        (recovered,) = [e for e in events if e["type"] == "recovered"]
        self.assertTrue(recovered["complete"])
        got = [m["text"] for m in seen] + [m["text"] for m in messages]
        self.assertEqual(got, texts)
        self.assertEqual(
            [m["seq"] for m in messages], list(range(last["seq"] + 1, 301))
        )

    @inlineCallbacks
    def test_lobby_recovery_in_the_url(self):
        """?since=epoch:seq recovers the lobby before any live message."""
        service, port = yield start_server(self)
        talker, _ = yield join_chat(self, port)
        listener, _ = yield join_chat(self, port)
        talker.send_json({"type": "message", "text": "seen"})
        seen = (yield read_until(listener, of_type("message")))[-1]
        listener.transport.abortConnection()
        yield listener.closed
        for text in ("missed 1", "missed 2"):
            talker.send_json({"type": "message", "text": text, "ref": text})
            yield read_until(talker, of_type("ack", ref=text))
        again, _ = yield join_chat(self, port, since=(seen["epoch"], seen["seq"]))
        talker.send_json({"type": "message", "text": "live"})
        events = yield read_until(again, lambda e: e.get("text") == "live")
        self.assertEqual(
            [(e["type"], e.get("text")) for e in events if e["type"] in ("message", "recovered")],
            [("message", "missed 1"), ("message", "missed 2"), ("recovered", None),
             ("message", "live")],
        )

    @inlineCallbacks
    def test_recovery_beyond_history_is_incomplete(self):
        """When more was missed than the room remembers, the client gets what
        exists and complete=false."""
        service, port = yield start_server(self, ["--history-size", "3"])
        talker, _ = yield join_chat(self, port)
        talker.send_json({"type": "message", "text": "first", "ref": 0})
        first = (yield read_until(talker, of_type("message")))[-1]
        for i in range(1, 6):
            talker.send_json({"type": "message", "text": str(i), "ref": i})
        yield read_until(talker, of_type("ack", ref=5))
        again, _ = yield join_chat(self, port)
        again.send_json(
            {"type": "join", "room": "lobby", "since": {"epoch": first["epoch"], "seq": first["seq"]}}
        )
        events = yield read_until(again, of_type("recovered"))
        self.assertEqual([e["text"] for e in events if e["type"] == "message"], ["3", "4", "5"])
        self.assertFalse(events[-1]["complete"])

    @inlineCallbacks
    def test_recovery_after_a_restart_is_incomplete(self):
        """A since from before a server restart (another epoch) is never complete."""
        service, port = yield start_server(self)
        talker, _ = yield join_chat(self, port)
        talker.send_json({"type": "message", "text": "before"})
        before = (yield read_until(talker, of_type("message")))[-1]
        yield service.stopService()

        service, port = yield start_server(self)
        again, _ = yield join_chat(self, port)
        again.send_json(
            {"type": "join", "room": "lobby", "since": {"epoch": before["epoch"], "seq": before["seq"]}}
        )
        recovered = (yield read_until(again, of_type("recovered")))[-1]
        self.assertFalse(recovered["complete"])


class AnonymousRoomsTests(TestCase):
    """--anonymous-rooms: what clients that do not sign in may do."""

    def grants(self, *args):
        from broadcaster.service.tap import Options

        options = Options()
        options.parseOptions(list(args))
        return options["anonymous-grants"]

    def test_defaults(self):
        """Everything without sign-in; with it, nothing, or the lobby for
        the raw ports that --anonymous-raw-ports keeps open."""
        self.assertTrue(self.grants().everything)
        signed = ("--auth-url", "http://127.0.0.1:1/check")
        self.assertEqual(self.grants(*signed).listed("lobby"), [])
        raw = self.grants(*signed, "--anonymous-raw-ports")
        self.assertEqual((raw.listed("lobby"), raw.listed("dev")), (["join", "publish", "history", "presence"], []))
        chosen = self.grants("--anonymous-rooms", "lobby, public-*")
        self.assertEqual([bool(chosen.listed(r)) for r in ("lobby", "public-1", "dev")], [True, True, False])

    def test_bad_patterns_name_the_flag(self):
        from twisted.python.usage import UsageError

        error = self.assertRaises(UsageError, self.grants, "--anonymous-rooms", "a*b")
        self.assertIn("--anonymous-rooms 'a*b'", str(error))

    @inlineCallbacks
    def test_every_kind_of_anonymous_client_keeps_to_them(self):
        """With --anonymous-rooms public-*, a JSON client is outside the
        lobby and may join public rooms only; a line-bridge client cannot
        post to the lobby and is told why."""
        from tests.support import connect_raw, port_of, wait_for
        from tests.test_hostile import LineClient

        service, port = yield start_server(self, ["--anonymous-rooms", "public-*"])
        client = yield connect_client(self, port, json_mode=True)
        welcome = yield client.next_json()
        self.assertEqual((welcome["type"], welcome["rights"], welcome["count"]), ("welcome", [], 1))
        client.send_json({"type": "join", "room": "public-1"})
        presence = (yield read_until(client, of_type("presence", room="public-1")))[-1]
        self.assertEqual(presence["rights"], ["join", "publish", "history", "presence"])
        client.send_json({"type": "join", "room": "staff", "ref": 1})
        error = (yield read_until(client, of_type("error")))[-1]
        self.assertEqual((error["ref"], error["reason"]), (1, "not allowed to join room 'staff'"))
        nc = yield connect_raw(self, port_of(service.line_endpoint), LineClient)
        nc.transport.write(b"hello lobby\n")
        yield wait_for(lambda: "ERROR" in nc.received(), what="the line bridge's refusal")
        self.assertEqual(nc.received(), "ERROR not in room 'lobby': join it first\n")
