"""
Tests for :mod:`broadcaster.clients.library`, the blocking ``Client``,
against real servers: the whole service in-process on a free port, a real
``twistd`` that is killed and started again, and, for what the real server
never does (replay overlapping what was seen, ignore a request, say nothing
at all), small scripted servers on real sockets.

The client blocks, so each call runs in a thread (:func:`deferToThread`)
while the reactor serves.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from typing import Callable, List, Optional

import jwt
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import FailTest, SynchronousTestCase, TestCase

import broadcaster
from broadcaster import (
    Client,
    ClientError,
    ConnectError,
    ConnectionClosed,
    HandshakeRefused,
    Recovered,
    RequestRefused,
    RequestTimeout,
)
from broadcaster.clients import library, sockets
from broadcaster.clients.backoff import Backoff
from broadcaster.core.names import LOBBY
from broadcaster.protocols.wire import JSON_SUBPROTOCOL
from tests.support import (
    checkout_env,
    connect_client,
    free_port,
    start_server,
    start_twistd,
    wait_for,
)

#: Seconds any one wait of these tests may take.
WAIT = 10.0


def collect(client: Client, until: Callable[[list], bool], events: Optional[list] = None,
            timeout: float = WAIT) -> list:
    """
    Blocking: append ``client``'s events to ``events`` until ``until(events)``.

    :raise FailTest: if ``timeout`` passes first.
    """
    events = [] if events is None else events
    deadline = time.monotonic() + timeout
    while not until(events):
        remaining = deadline - time.monotonic()
        event = client.receive(timeout=remaining) if remaining > 0 else None
        if event is None:
            raise FailTest("not all awaited within {}s; got {!r}".format(timeout, events))
        events.append(event)
    return events


def messages(events: list, room: Optional[str] = None) -> List[dict]:
    return [
        e for e in events
        if isinstance(e, dict) and e["type"] == "message" and room in (None, e["room"])
    ]


def texts(events: list, room: str = LOBBY) -> List[str]:
    return [e["text"] for e in messages(events, room)]


def recoveries(events: list) -> List[Recovered]:
    return [e for e in events if isinstance(e, Recovered)]


def of_type(kind: str) -> Callable[[list], bool]:
    return lambda events: any(isinstance(e, dict) and e["type"] == kind for e in events)


class PackageTests(SynchronousTestCase):
    def test_the_package_exports_the_library_lazily(self):
        """broadcaster exports the library's names; importing the server
        does not import websocket-client, and without it the error says
        what to install."""
        self.assertEqual(set(broadcaster._CLIENT_NAMES), set(library.__all__))
        self.assertIs(broadcaster.Client, library.Client)
        script = (
            "import sys, broadcaster.service.tap\n"
            "assert 'websocket' not in sys.modules, 'the server imports websocket-client'\n"
            "sys.modules['websocket'] = None\n"
            "try:\n"
            "    from broadcaster import Client\n"
            "except ImportError as e:\n"
            "    print(e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], env=checkout_env(), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual((out.returncode, out.stderr), (0, ""))
        self.assertIn("pip install broadcaster[client]", out.stdout)


class LibraryTestCase(TestCase):
    timeout = 60

    @inlineCallbacks
    def connect(self, url: str, **kwargs):
        """
        Connect a :class:`Client` (in a thread), closed when the test ends.
        """
        client = yield deferToThread(Client.connect, url, **kwargs)
        self.addCleanup(deferToThread, client.close)
        return client


class ClientTests(LibraryTestCase):
    """
    The client against the whole service, in-process.
    """

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self)
        self.url = "ws://127.0.0.1:{}/".format(self.port)

    @inlineCallbacks
    def test_connect_reads_the_welcome(self):
        """Connecting reads the welcome (id, name, limits); our own join in
        the lobby is the first event."""
        client = yield self.connect(self.url, name="ann")
        self.assertEqual((client.welcome["type"], client.welcome["name"]), ("welcome", "ann"))
        self.assertEqual(client.id, client.welcome["id"])
        self.assertIsNone(client.user)
        self.assertIsInstance(client.limits["max_message_size"], int)
        self.assertEqual(client.rooms, [LOBBY])
        joined = yield deferToThread(client.receive, WAIT)
        self.assertEqual(
            (joined["type"], joined["room"], joined["id"]), ("join", LOBBY, client.id)
        )

    @inlineCallbacks
    def test_send_returns_the_ack_and_nothing_is_lost_meanwhile(self):
        """send returns the ack with seq and epoch; events that arrive while
        a request waits for its answer are kept for iteration, in order."""
        client = yield self.connect(self.url)
        bob = yield self.connect(self.url)
        ack = yield deferToThread(client.send, "hello")
        self.assertEqual((ack["type"], ack["room"]), ("ack", LOBBY))
        self.assertEqual(ack["epoch"], client.welcome["epoch"])
        self.assertEqual(ack["seq"], client.welcome["seq"] + 1)
        yield deferToThread(bob.send, "from bob")
        # Bob's message was on its way before this request: who reads past it.
        yield deferToThread(client.who)
        events = yield deferToThread(collect, client, lambda ev: "from bob" in texts(ev))
        self.assertEqual(texts(events), ["hello", "from bob"])
        echo = messages(events)[0]
        self.assertEqual((echo["seq"], echo["from"]), (ack["seq"], client.id))

        # Too big for the server: refused here, not by a 1009 that would
        # end the connection.
        too_big = "x" * client.limits["max_message_size"]
        yield self.assertFailure(deferToThread(client.send, too_big), ValueError)
        again = yield deferToThread(client.send, "still here")
        self.assertEqual(again["seq"], ack["seq"] + 2)

    @inlineCallbacks
    def test_a_script_that_only_sends_keeps_a_bounded_backlog(self):
        """Events kept while requests await their answers stop at
        max_pending: the oldest go, counted in dropped."""
        client = yield self.connect(self.url, max_pending=5)
        bob = yield self.connect(self.url)
        for i in range(12):
            yield deferToThread(bob.send, "b{}".format(i))
        # Each send reads past what arrived before its ack, and keeps it.
        for i in range(3):
            yield deferToThread(client.send, "a{}".format(i))
        self.assertEqual(len(client._pending), 5)
        self.assertGreater(client.dropped, 0)
        events = yield deferToThread(collect, client, lambda ev: "a2" in texts(ev))
        self.assertIn("a2", texts(events))

    @inlineCallbacks
    def test_a_refused_request_raises_with_the_reason(self):
        """A message to a room not joined raises RequestRefused with the
        server's reason and the request's ref; the connection stays usable."""
        client = yield self.connect(self.url)
        refused = yield self.assertFailure(
            deferToThread(client.send, "hi", room="dev"), RequestRefused
        )
        self.assertEqual(refused.reason, "not in room 'dev': join it first")
        self.assertEqual(refused.request, "message")
        self.assertIsInstance(refused.ref, int)
        ack = yield deferToThread(client.send, "hi")
        self.assertEqual(ack["type"], "ack")

    @inlineCallbacks
    def test_join_history_who_and_leave(self):
        """join answers the room's presence; history pages back with
        limit, more and before; who lists the members; after leave the
        room is refused."""
        client = yield self.connect(self.url, name="ann")
        presence = yield deferToThread(client.join, "dev")
        self.assertEqual(
            (presence["type"], presence["room"], presence["count"]), ("presence", "dev", 1)
        )
        self.assertIn("publish", presence["rights"])
        self.assertEqual(client.rooms, [LOBBY, "dev"])
        for text in ("one", "two", "three"):
            yield deferToThread(client.send, text, room="dev")

        history = yield deferToThread(client.history, "dev")
        self.assertEqual((texts(history["messages"], "dev"), history["more"]),
                         (["one", "two", "three"], False))
        page = yield deferToThread(client.history, "dev", limit=2)
        self.assertEqual((texts(page["messages"], "dev"), page["more"]), (["two", "three"], True))
        older = yield deferToThread(
            client.history, "dev", before=page["messages"][0]["seq"]
        )
        self.assertEqual(texts(older["messages"], "dev"), ["one"])

        who = yield deferToThread(client.who, "dev")
        self.assertEqual((who["count"], who["members"]), (1, [{"id": client.id, "name": "ann"}]))

        refused = yield self.assertFailure(deferToThread(client.join, "-bad"), RequestRefused)
        self.assertIn("room", refused.reason)
        self.assertEqual(client.rooms, [LOBBY, "dev"])

        yield deferToThread(client.leave, "dev")
        self.assertEqual(client.rooms, [LOBBY])
        refused = yield self.assertFailure(deferToThread(client.history, "dev"), RequestRefused)
        self.assertEqual(refused.reason, "not in room 'dev': join it first")

    @inlineCallbacks
    def test_iteration_yields_what_others_send(self):
        """Others' text, binary and image messages are yielded; binary and
        image events carry the bytes that followed them as data."""
        ann = yield self.connect(self.url, name="ann")
        bob = yield self.connect(self.url, name="bob")
        yield deferToThread(bob.send, "hi from bob")
        events = yield deferToThread(collect, ann, lambda ev: "hi from bob" in texts(ev))
        [message] = messages(events)
        self.assertEqual((message["from"], message["name"]), (bob.id, "bob"))

        payload = bytes(range(256)) * 4
        yield deferToThread(bob.send_binary, payload)
        events = yield deferToThread(collect, ann, of_type("binary"))
        [binary] = [e for e in events if e["type"] == "binary"]
        self.assertEqual((binary["from"], binary["size"], binary["data"]), (bob.id, 1024, payload))

        endpoint = yield self.service.image_endpoint.when_listening()
        camera = yield deferToThread(sockets.connect, "127.0.0.1", endpoint.getHost().port)
        self.addCleanup(sockets.close, camera)
        yield deferToThread(sockets.send_image, camera, Image.new("RGB", (8, 6), "red"))
        events = yield deferToThread(collect, ann, of_type("image"))
        [image] = [e for e in events if e["type"] == "image"]
        self.assertEqual((image["width"], image["height"], image["size"]), (8, 6, len(image["data"])))
        with Image.open(io.BytesIO(image["data"])) as decoded:
            self.assertEqual((decoded.format, decoded.size), ("PNG", (8, 6)))

    @inlineCallbacks
    def test_a_dropped_connection_loses_and_repeats_nothing(self):
        """When the client's own socket drops, it reconnects, yields each
        message sent meanwhile exactly once, in order, and Recovered(room,
        complete=True) for each room."""
        ann = yield self.connect(
            self.url, rooms=["dev"], backoff=Backoff(initial=0.2, random=lambda: 0.99)
        )
        first_id = ann.id
        publisher = yield connect_client(self, self.port, json_mode=True)
        publisher.send_json({"type": "join", "room": "dev"})

        def publish(text):
            for room in (LOBBY, "dev"):
                publisher.send_json({"type": "message", "room": room, "text": text})

        events: list = []
        reading = deferToThread(
            collect, ann, lambda ev: "end" in texts(ev) and "end" in texts(ev, "dev"), events
        )
        for i in range(5):
            publish("m{}".format(i))
        yield wait_for(lambda: len(messages(events)) == 10, what="the first messages")
        # Its socket goes, under the client's feet: what is published now
        # (0.2 s before it reconnects) only a replay can bring.
        ann._ws.sock.shutdown(socket.SHUT_RDWR)
        for i in range(5, 10):
            publish("m{}".format(i))
        yield wait_for(
            lambda: recoveries(events) == [Recovered(LOBBY, True), Recovered("dev", True)],
            what="Recovered in both rooms",
        )
        publish("end")
        yield reading

        expected = ["m{}".format(i) for i in range(10)] + ["end"]
        self.assertEqual(texts(events, LOBBY), expected)
        self.assertEqual(texts(events, "dev"), expected)
        [renewed] = [e for e in events if isinstance(e, dict) and e["type"] == "welcome"]
        self.assertNotEqual(renewed["id"], first_id)
        self.assertEqual(ann.id, renewed["id"])

    @inlineCallbacks
    def test_expelled_is_final(self):
        """Closed with 4003 (disconnected by the server), the client does
        not reconnect: iteration and every later call raise ConnectionClosed."""
        client = yield self.connect(self.url)
        reading = deferToThread(collect, client, lambda ev: False)
        [member] = [m for m in self.service.hub.members() if m.id == client.id]
        member.expel("go away")
        closed = yield self.assertFailure(reading, ConnectionClosed)
        self.assertEqual((closed.code, closed.reason, closed.final), (4003, "go away", True))
        again = yield self.assertFailure(deferToThread(client.send, "back"), ConnectionClosed)
        self.assertEqual(again.code, 4003)
        yield wait_for(lambda: len(self.service.hub) == 0, what="the server to let it go")

    @inlineCallbacks
    def test_close_from_another_thread_ends_iteration(self):
        """A second thread calling in meanwhile is refused; close() from it
        wakes the iterating thread, whose loop ends."""
        client = yield self.connect(self.url)
        events: list = []

        def iterate():
            for event in client:
                events.append(event)
            return "ended"

        iterating = deferToThread(iterate)
        yield wait_for(lambda: events, what="the first event")
        busy = yield self.assertFailure(deferToThread(client.send, "x"), ClientError)
        self.assertIn("another thread", str(busy))
        yield deferToThread(client.close)
        self.assertEqual((yield iterating), "ended")
        yield self.assertFailure(deferToThread(client.send, "x"), ClientError)

    @inlineCallbacks
    def test_nothing_listening_is_a_connect_error(self):
        """Connecting where nothing listens raises ConnectError at once."""
        url = "ws://127.0.0.1:{}/".format(free_port())
        error = yield self.assertFailure(deferToThread(Client.connect, url), ConnectError)
        self.assertIn("cannot connect to {}".format(url), str(error))


class SignInTests(LibraryTestCase):
    SECRET = "library-secret-5d2c8e1f7a3b4c6d9e0f1a2b3c4d5e6f"

    @inlineCallbacks
    def test_the_token_is_a_bearer_header(self):
        """With --jwt-secret-file, no token is refused with 403
        (HandshakeRefused, not retried); a token signs in as its sub."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(self.SECRET + "\n")
        service, port = yield start_server(self, ["--jwt-secret-file", path])
        url = "ws://127.0.0.1:{}/".format(port)
        refused = yield self.assertFailure(deferToThread(Client.connect, url), HandshakeRefused)
        self.assertEqual(refused.status, 403)
        self.assertIn("403", str(refused))

        token = jwt.encode({"sub": "u-7", "exp": int(time.time()) + 600}, self.SECRET, "HS256")
        client = yield self.connect(url, token=token)
        self.assertEqual((client.user, client.welcome["user"]), ("u-7", "u-7"))


class ScriptedServer(WebSocketServerProtocol):
    """
    A JSON-mode server that plays its factory's next script to each
    connection: events to send, then whether to drop the connection
    (without a close frame, as a failing network would).
    """

    def onConnect(self, request):
        self.factory.handshakes.append(request.params)
        return JSON_SUBPROTOCOL

    def onOpen(self):
        events, drop = self.factory.scripts.pop(0)
        for event in events:
            self.sendMessage(json.dumps(event).encode("utf-8"))
        if drop:
            self.transport.loseConnection()

    def onPing(self, payload):
        if self.factory.answers_pings:
            super().onPing(payload)


def welcome(id, seq):
    return {"type": "welcome", "id": id, "name": None, "room": LOBBY, "members": [],
            "count": 1, "next": None, "epoch": "e1", "seq": seq, "limits": {}}


def message(seq):
    return {"type": "message", "room": LOBBY, "from": "x-1", "name": None,
            "text": str(seq), "ts": 1.0, "seq": seq, "epoch": "e1"}


class ScriptedServerTests(LibraryTestCase):
    """
    What the real server does not do, on real sockets.
    """

    def serve(self, factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return "ws://127.0.0.1:{}/".format(port.getHost().port)

    def scripted(self, *scripts):
        factory = WebSocketServerFactory()
        factory.protocol = ScriptedServer
        factory.scripts = list(scripts)
        factory.handshakes = []
        factory.answers_pings = True
        return factory, self.serve(factory)

    @inlineCallbacks
    def test_a_replay_overlapping_what_was_seen_is_not_repeated(self):
        """After a drop the client asks for the lobby since the last
        message seen; replayed messages it had seen already are dropped."""
        factory, url = self.scripted(
            ([welcome("c-1", 0), message(1), message(2), message(3)], True),
            # As a networked backplane may: the replay overlaps what came live.
            ([welcome("c-2", 5), message(2), message(3), message(4),
              {"type": "recovered", "room": LOBBY, "complete": True}, message(5)], False),
        )
        client = yield self.connect(url, backoff=Backoff(random=lambda: 0.0))
        events = yield deferToThread(collect, client, lambda ev: "5" in texts(ev))
        self.assertEqual(texts(events), ["1", "2", "3", "4", "5"])
        self.assertEqual(recoveries(events), [Recovered(LOBBY, True)])
        self.assertEqual(factory.handshakes[1]["since"], ["e1:3"])
        self.assertEqual(client.id, "c-2")

    @inlineCallbacks
    def test_an_unanswered_request_times_out(self):
        """A request the server never answers raises RequestTimeout after
        its timeout; the connection stays open."""
        factory, url = self.scripted(([welcome("c-1", 0)], False))
        client = yield self.connect(url)
        started = time.monotonic()
        error = yield self.assertFailure(
            deferToThread(client.send, "anyone?", timeout=0.3), RequestTimeout
        )
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertEqual((error.request, error.timeout), ("message", 0.3))
        self.assertIn("no answer to message within 0.3 s", str(error))
        self.assertIsNone((yield deferToThread(client.receive, 0.1)))

    @inlineCallbacks
    def test_a_server_gone_silent_is_left(self):
        """A server silent for keepalive seconds is pinged; silent as long
        again, it is taken for gone and the client connects anew."""
        factory, url = self.scripted(
            ([welcome("c-1", 0)], False), ([welcome("c-2", 0), message(1)], False)
        )
        factory.answers_pings = False
        client = yield self.connect(url, keepalive=0.2, backoff=Backoff(random=lambda: 0.0))
        started = time.monotonic()
        events = yield deferToThread(collect, client, lambda ev: "1" in texts(ev))
        self.assertGreaterEqual(time.monotonic() - started, 0.4)
        self.assertEqual((client.id, len(factory.handshakes)), ("c-2", 2))
        self.assertEqual([e["type"] for e in events], ["welcome", "message"])

    @inlineCallbacks
    def test_a_silent_server_is_a_connect_error(self):
        """A server that accepts the TCP connection and never answers the
        handshake makes connect raise ConnectError after its timeout."""
        connections: list = []

        class Silent(Protocol):
            def connectionMade(self):
                connections.append(self)

            def connectionLost(self, reason):
                connections.remove(self)

        url = self.serve(Factory.forProtocol(Silent))
        error = yield self.assertFailure(
            deferToThread(Client.connect, url, timeout=0.5), ConnectError
        )
        self.assertNotIsInstance(error, HandshakeRefused)
        self.assertIn("no answer within 0.5 s", str(error))
        yield wait_for(lambda: not connections, what="the client to hang up")


class RestartTests(LibraryTestCase):
    """
    A real ``twistd`` killed and started again on the same port.
    """

    timeout = 120

    @inlineCallbacks
    def test_iteration_goes_on_across_a_restart(self):
        """Iteration goes on across a restart: the client reconnects on its
        own, yields Recovered(room, complete=False) for the lobby and its
        room (the epoch changed), and then what is sent on the new server."""
        process, port = yield start_twistd(self)
        url = "ws://127.0.0.1:{}/".format(port)
        client = yield self.connect(url, rooms=["dev"], backoff=Backoff(initial=0.2, maximum=1.0))
        first_epoch = client.welcome["epoch"]
        for room in (LOBBY, "dev"):
            yield deferToThread(client.send, "before", room=room)

        events: list = []
        reading = deferToThread(
            collect,
            client,
            lambda ev: texts(ev)[-1:] == texts(ev, "dev")[-1:] == ["after"]
            and len(recoveries(ev)) == 2,
            events,
            60,
        )
        yield wait_for(lambda: texts(events) == texts(events, "dev") == ["before"],
                       what="the messages before the restart")
        process.transport.signalProcess("KILL")
        yield process.ended()
        yield start_twistd(self, port=port)
        publisher = yield connect_client(self, port, json_mode=True)
        publisher.send_json({"type": "join", "room": "dev"})
        for room in (LOBBY, "dev"):
            publisher.send_json({"type": "message", "room": room, "text": "after"})
        yield reading

        self.assertEqual(texts(events), ["before", "after"])
        self.assertEqual(texts(events, "dev"), ["before", "after"])
        self.assertEqual(sorted(recoveries(events), key=lambda r: r.room),
                         [Recovered("dev", False), Recovered(LOBBY, False)])
        [renewed] = [e for e in events if isinstance(e, dict) and e["type"] == "welcome"]
        self.assertNotEqual(renewed["epoch"], first_epoch)
