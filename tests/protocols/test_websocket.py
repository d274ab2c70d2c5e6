"""
Tests for :mod:`broadcaster.protocols.websocket` against a real server on a loopback
port, with real WebSocket clients: Autobahn's, and the ``websocket-client``
package that script users reach for.
"""

import json

import websocket as websocket_client
from twisted.internet.defer import inlineCallbacks
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.core.flow import Limits
from broadcaster.protocols.origin import OriginPolicy
from broadcaster.protocols.internals import LeanTCPServer, LeanWebSocketServerProtocol
from broadcaster.protocols.websocket import BroadcastServerFactory, BroadcastServerProtocol

from tests.support import (
    immediate_hub,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    LineClient,
    build_frame,
    close_payload,
    connect_client,
    connect_raw,
    port_of,
    connect_plain_clients,
    handshake_request,
    self_signed_certificate,
    start_server,
    wait_for,
)


def _events(logged, level=None, fragment=""):
    return [
        e
        for e in logged
        if (level is None or e["log_level"] == level) and fragment in e.get("log_format", "")
    ]


class PlainModeTests(TestCase):
    """Clients that ask for no subprotocol: the classic example's format."""

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self)

    @inlineCallbacks
    def test_connect_is_announced_to_newcomer_and_others(self):
        """Everyone, the newcomer included, hears '<id> connected'."""
        ann = yield connect_client(self, self.port)
        ann_announcement = yield ann.next_text()
        self.assertRegex(ann_announcement, r"^\S+-1 connected$")
        bob = yield connect_client(self, self.port)
        bob_id = (yield bob.next_text()).split()[0]
        self.assertEqual((yield ann.next_text()), "{} connected".format(bob_id))
        self.assertNotEqual(bob_id, ann_announcement.split()[0])

    @inlineCallbacks
    def test_connections_keep_their_state_in_slots(self):
        """An open connection's protocol and TCP transport hold no
        instance dict (what an idle client costs the server)."""
        ann = yield connect_client(self, self.port)
        yield ann.next_text()
        (member,) = self.service.hub.members()
        self.assertIsInstance(member.transport, LeanTCPServer)
        for thing in (member, member.transport):
            self.assertEqual(vars(thing) if hasattr(thing, "__dict__") else {}, {})

    @inlineCallbacks
    def test_connections_do_not_wait_for_nagle(self):
        """Every WebSocket connection has TCP_NODELAY (a small frame goes
        out at once), though it is set on the listening socket only."""
        ann = yield connect_client(self, self.port)
        yield ann.next_text()
        (member,) = self.service.hub.members()
        self.assertTrue(member.transport.getTcpNoDelay())

    @inlineCallbacks
    def test_disconnect_is_announced_to_the_others(self):
        """When a client leaves, the others hear '<id> disconnected'."""
        ann = yield connect_client(self, self.port)
        yield ann.next_text()
        bob = yield connect_client(self, self.port)
        bob_id = (yield bob.next_text()).split()[0]
        yield ann.next_text()
        bob.sendClose()
        yield bob.closed
        self.assertEqual((yield ann.next_text()), "{} disconnected".format(bob_id))

    @inlineCallbacks
    def test_text_reaches_everyone_unchanged(self):
        """A text message reaches every client, the sender included, byte for byte."""
        (ann, _), (bob, _) = yield connect_plain_clients(self, self.port, 2)
        text = 'Hello {"json": "untouched"} \u00e9\u2603'
        ann.send_text(text)
        self.assertEqual((yield ann.next_text()), text)
        self.assertEqual((yield bob.next_text()), text)

    @inlineCallbacks
    def test_binary_reaches_everyone_as_binary(self):
        """A binary message is fanned out unchanged and stays binary."""
        ann = yield connect_client(self, self.port)
        yield ann.next_text()
        bob = yield connect_client(self, self.port)
        yield bob.next_text()
        yield ann.next_text()
        data = bytes(range(256)) * 4
        bob.sendMessage(data, isBinary=True)
        self.assertEqual((yield ann.next()), (data, True))
        self.assertEqual((yield bob.next()), (data, True))

    @inlineCallbacks
    def test_many_senders_complete_and_in_order(self):
        """3 clients sending 50 messages each at once: every client gets all
        150, and each sender's messages in the order sent."""
        clients = [c for c, _ in (yield connect_plain_clients(self, self.port, 3))]
        for n, client in enumerate(clients):
            for i in range(50):
                client.send_text("{}:{}".format(n, i))
        for client in clients:
            got = []
            for _ in range(150):
                got.append((yield client.next_text()))
            for n in range(3):
                mine = [int(t.split(":")[1]) for t in got if t.startswith("{}:".format(n))]
                self.assertEqual(mine, list(range(50)))

    @inlineCallbacks
    def test_client_vanishing_mid_broadcast(self):
        """A client that drops its TCP connection while messages are flowing
        does not stop the others receiving every message."""
        (ann, _), (bob, _), (victim, victim_id) = yield connect_plain_clients(
            self, self.port, 3
        )
        for i in range(200):
            ann.send_text(str(i))
            if i == 50:
                victim.transport.abortConnection()
        texts = []
        for _ in range(201):
            texts.append((yield bob.next_text()))
        texts.remove("{} disconnected".format(victim_id))
        self.assertEqual(texts, [str(i) for i in range(200)])
        yield wait_for(lambda: len(self.service.hub) == 2, what="victim to be removed")

    @inlineCallbacks
    def test_script_user_with_websocket_client(self):
        """The websocket-client package, as a script user would use it, chats
        with an Autobahn client."""
        ann = yield connect_client(self, self.port)
        ann_id = (yield ann.next_text()).split()[0]

        def script():
            ws = websocket_client.create_connection(
                "ws://127.0.0.1:{}/".format(self.port), timeout=10
            )
            try:
                my_id = ws.recv().split()[0]
                ws.send("from script")
                heard = [ws.recv(), ws.recv()]
                return my_id, heard
            finally:
                ws.close()

        sent = deferToThread(script)
        script_id = (yield ann.next_text()).split()[0]
        ann.send_text("from autobahn")
        my_id, heard = yield sent
        self.assertEqual(my_id, script_id)
        self.assertEqual(sorted(heard), ["from autobahn", "from script"])
        received = []
        for _ in range(3):
            received.append((yield ann.next_text()))
        self.assertIn("from script", received)
        self.assertIn("{} disconnected".format(script_id), received)
        self.assertNotEqual(ann_id, script_id)

    @inlineCallbacks
    def test_query_string_is_allowed_on_the_handshake(self):
        """Clients may connect to '/?name=ann' like to '/'."""
        ann = yield connect_client(self, self.port, path="/?name=ann")
        self.assertRegex((yield ann.next_text()), r" connected$")

    @inlineCallbacks
    def test_oversized_message_closes_only_its_sender(self):
        """A message above --max-message-size closes its sender with 1009
        and the others keep chatting."""
        (ann, _), (bob, _) = yield connect_plain_clients(self, self.port, 2)
        bob.send_text("x" * (64 * 1024 + 1))
        _, code, _ = yield bob.closed
        self.assertEqual(code, 1009)
        self.assertRegex((yield ann.next_text()), r"disconnected$")
        ann.send_text("still here")
        self.assertEqual((yield ann.next_text()), "still here")


class JSONModeTests(TestCase):
    """Clients that ask for the broadcaster.json subprotocol."""

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self)

    @inlineCallbacks
    def test_welcome_then_join(self):
        """The first event names the client and who is present, then its join follows."""
        ann = yield connect_client(self, self.port)
        ann_id = (yield ann.next_text()).split()[0]
        bob = yield connect_client(self, self.port, json_mode=True)
        self.assertEqual(bob.subprotocol, "broadcaster.json")
        welcome = yield bob.next_json()
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual([m["id"] for m in welcome["members"]], [ann_id, welcome["id"]])
        join = yield bob.next_json()
        self.assertEqual((join["type"], join["id"]), ("join", welcome["id"]))

    @inlineCallbacks
    def test_messages_between_json_and_plain_clients(self):
        """JSON and plain clients see each other's messages, each in their format."""
        plain = yield connect_client(self, self.port)
        plain_id = (yield plain.next_text()).split()[0]
        js = yield connect_client(self, self.port, json_mode=True)
        js_id = (yield js.next_json())["id"]
        yield js.next_json()
        self.assertEqual((yield plain.next_text()), "{} connected".format(js_id))

        js.send_json({"type": "message", "text": "from json"})
        self.assertEqual((yield plain.next_text()), "from json")
        event = yield js.next_json()
        self.assertEqual(
            (event["type"], event["from"], event["text"]), ("message", js_id, "from json")
        )
        self.assertIsInstance(event["ts"], float)

        plain.send_text("from plain")
        self.assertEqual((yield plain.next_text()), "from plain")
        event = yield js.next_json()
        self.assertEqual((event["from"], event["text"]), (plain_id, "from plain"))

    @inlineCallbacks
    def test_leave_event(self):
        """A departing client is announced to JSON clients as a leave event."""
        js = yield connect_client(self, self.port, json_mode=True)
        yield js.next_json()
        yield js.next_json()
        other = yield connect_client(self, self.port, json_mode=True)
        other_id = (yield other.next_json())["id"]
        yield js.next_json()
        other.sendClose()
        event = yield js.next_json()
        self.assertEqual((event["type"], event["id"]), ("leave", other_id))

    @inlineCallbacks
    def test_binary_is_announced_then_sent(self):
        """JSON clients receive a binary header naming sender and size, then the bytes."""
        js = yield connect_client(self, self.port, json_mode=True)
        js_id = (yield js.next_json())["id"]
        yield js.next_json()
        js.sendMessage(b"\x89PNG...", isBinary=True)
        header = yield js.next_json()
        self.assertEqual(
            (header["type"], header["from"], header["size"]), ("binary", js_id, 7)
        )
        self.assertEqual((yield js.next()), (b"\x89PNG...", True))

    @inlineCallbacks
    def test_bad_input_gets_an_error_and_the_connection_stays(self):
        """Malformed JSON, unknown types and missing fields each get an error
        event and a warning in the log, and the client can carry on."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        js = yield connect_client(self, self.port, json_mode=True)
        yield js.next_json()
        yield js.next_json()
        for bad, reason in [
            ("not json", "malformed JSON"),
            ('{"type": "dance"}', "unknown type"),
            ('{"type": "message"}', '"text"'),
        ]:
            js.send_text(bad)
            event = yield js.next_json()
            self.assertEqual(event["type"], "error")
            self.assertIn(reason, event["reason"])
        js.send_json({"type": "message", "text": "ok"})
        self.assertEqual((yield js.next_json())["text"], "ok")
        self.assertEqual(len(_events(logged, LogLevel.warn, "[BAD INPUT]")), 3)


class OriginPolicyTests(TestCase):
    """The handshake's Origin check, end to end."""

    def handshake(self, port, origin):
        def connect():
            ws = websocket_client.create_connection(
                "ws://127.0.0.1:{}/".format(port), origin=origin, timeout=10
            )
            try:
                return ws.recv()
            finally:
                ws.close()

        return deferToThread(connect)

    @inlineCallbacks
    def test_foreign_origin_is_refused_with_403(self):
        """A browser on another site gets HTTP 403 and a warning is logged."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, port = yield start_server(self)
        failure = yield self.assertFailure(
            self.handshake(port, "http://evil.example"),
            websocket_client.WebSocketBadStatusException,
        )
        self.assertEqual(failure.status_code, 403)
        refused = _events(logged, LogLevel.warn, "[REFUSED]")
        self.assertEqual([e["origin"] for e in refused], ["http://evil.example"])
        self.assertEqual(len(service.hub), 0)

    @inlineCallbacks
    def test_own_origin_and_no_origin_are_accepted(self):
        """The server's own page and scripts without Origin may connect."""
        _, port = yield start_server(self)
        greeting = yield self.handshake(port, "http://127.0.0.1:{}".format(port))
        self.assertRegex(greeting, r" connected$")
        greeting = yield self.handshake(port, None)
        self.assertRegex(greeting, r" connected$")

    @inlineCallbacks
    def test_allow_origin_accepts_the_named_site(self):
        """--allow-origin lets that site in and still keeps others out."""
        _, port = yield start_server(self, ["--allow-origin", "https://app.example"])
        greeting = yield self.handshake(port, "https://app.example")
        self.assertRegex(greeting, r" connected$")
        yield self.assertFailure(
            self.handshake(port, "https://other.example"),
            websocket_client.WebSocketBadStatusException,
        )

    @inlineCallbacks
    def test_allow_origin_star_accepts_everyone(self):
        """--allow-origin '*' accepts any site."""
        _, port = yield start_server(self, ["--allow-origin", "*"])
        greeting = yield self.handshake(port, "http://evil.example")
        self.assertRegex(greeting, r" connected$")


class LoggingTests(TestCase):
    """What an operator watching the log sees."""

    @inlineCallbacks
    def test_handshake_connect_and_disconnect_are_logged(self):
        """The connect with its handshake (peer, path, Origin, User-Agent)
        in one line, and the disconnect (code, duration) are logged at
        info, and no payload is."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, port = yield start_server(self)
        client = yield connect_client(
            self,
            port,
            path="/?name=ann",
            headers={"Origin": "http://127.0.0.1:{}".format(port)},
            useragent="tester/1",
        )
        client_id = (yield client.next_text()).split()[0]
        client.send_text("secret payload")
        yield client.next_text()
        client.sendClose(1000, "bye")
        yield client.closed
        yield wait_for(lambda: _events(logged, LogLevel.info, "[DISCONNECT]"), what="log")

        self.assertEqual(_events(logged, LogLevel.info, "[HANDSHAKE]"), [])
        (connect,) = _events(logged, LogLevel.info, "[CONNECT]")
        self.assertEqual(connect["client"], client_id)
        self.assertEqual(connect["origin"], "http://127.0.0.1:{}".format(port))
        self.assertEqual(connect["path"], "/")
        self.assertEqual(connect["agent"], "tester/1")
        self.assertIn("127.0.0.1", connect["peer"])
        self.assertIn("agent='tester/1'", formatEvent(connect))
        (disconnect,) = _events(logged, LogLevel.info, "[DISCONNECT]")
        self.assertEqual(
            (disconnect["client"], disconnect["code"], disconnect["reason"]),
            (client_id, 1000, "bye"),
        )
        self.assertGreaterEqual(disconnect["duration"], 0)
        for event in logged:
            self.assertNotIn("secret payload", json.dumps(event, default=repr))


class RefusedHandshakeLogTests(TestCase):
    @inlineCallbacks
    def test_a_refused_handshake_is_logged_after_why(self):
        """A handshake that does not open is logged after the refusal
        saying why, with its path, Origin and User-Agent, and nothing is
        logged as connected."""
        from tests.http.test_web import handshake

        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, port = yield start_server(self)
        status = yield handshake(port, "127.0.0.1:{}".format(port), "http://evil.example")
        self.assertEqual(status, 403)
        yield wait_for(lambda: _events(logged, LogLevel.info, "[HANDSHAKE]"), what="log")
        tags = [e["log_format"].split("]")[0] + "]" for e in logged if "log_format" in e]
        self.assertEqual([t for t in tags if t in ("[REFUSED]", "[HANDSHAKE]")], ["[REFUSED]", "[HANDSHAKE]"])
        (refused,) = _events(logged, LogLevel.info, "[HANDSHAKE]")
        self.assertEqual((refused["path"], refused["origin"]), ("/", "http://evil.example"))
        self.assertIn("not opened", formatEvent(refused))
        self.assertEqual(_events(logged, None, "[CONNECT]"), [])


class TLSTests(TestCase):
    """--port ssl:...: wss:// and https:// on one port."""

    @inlineCallbacks
    def test_wss_with_own_https_origin(self):
        """Over TLS the page's https origin is the server's own and may chat;
        an http origin for the same host is foreign."""
        key, cert = self_signed_certificate(self.mktemp_dir())
        _, port = yield start_server(
            self,
            [
                "--port",
                "ssl:0:interface=127.0.0.1:privateKey={}:certKey={}".format(key, cert),
            ],
        )

        def chat(origin):
            ws = websocket_client.create_connection(
                "wss://127.0.0.1:{}/".format(port),
                origin=origin,
                timeout=10,
                sslopt={"ca_certs": cert},
            )
            try:
                greeting = ws.recv()
                ws.send("over tls")
                return greeting, ws.recv()
            finally:
                ws.close()

        greeting, echo = yield deferToThread(chat, "https://127.0.0.1:{}".format(port))
        self.assertRegex(greeting, r" connected$")
        self.assertEqual(echo, "over tls")
        failure = yield self.assertFailure(
            deferToThread(chat, "http://127.0.0.1:{}".format(port)),
            websocket_client.WebSocketBadStatusException,
        )
        self.assertEqual(failure.status_code, 403)

    def mktemp_dir(self):
        import os

        path = self.mktemp()
        os.makedirs(path)
        return path


class ProtocolUnitTests(SynchronousTestCase):
    """The protocol over in-memory transports: what bytes go where."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.hub = immediate_hub(self.reactor, node_id="t")
        self.factory = BroadcastServerFactory(self.hub, OriginPolicy(), self.reactor)

    def connect(self, json_mode=False, transport=None):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = transport or StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(handshake_request(json_mode))
        self.assertIn(b"101 Switching Protocols", transport.value())
        transport.clear()
        return protocol, transport

    def test_each_event_is_framed_once_per_format(self):
        """Recipients of one format get the very same frame bytes, encoded once."""
        ann, ann_t = self.connect()
        bob, bob_t = self.connect()
        js, js_t = self.connect(json_mode=True)
        for t in (ann_t, bob_t, js_t):
            t.clear()
        from broadcaster.protocols import websocket as websocket_module

        encodings = []
        cached = websocket_module.encoded

        def counted(event, key, encode):
            if key not in event.wire:
                encodings.append((event, key))
            return cached(event, key, encode)

        self.patch(websocket_module, "encoded", counted)
        event = self.successResultOf(self.hub.publish_text(ann.id, "hi"))
        self.assertEqual(ann_t.value(), b"\x81\x02hi")
        self.assertEqual(bob_t.value(), b"\x81\x02hi")
        self.assertIn(b'"text":"hi"', js_t.value())
        # Once per format (the event's frames, then the batch's)...
        self.assertEqual(len([e for e, _ in encodings if e is event]), 2)
        # ...and dropped once the round is done: the event is kept in history.
        self.assertEqual(event.wire, {})

    def test_masked_client_frame_is_broadcast(self):
        """A masked text frame from a client reaches the others unmasked."""
        ann, ann_t = self.connect()
        bob, bob_t = self.connect()
        ann_t.clear()
        mask = b"\x01\x02\x03\x04"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"yo"))
        bob.dataReceived(b"\x81\x82" + mask + payload)
        self.assertEqual(ann_t.value(), b"\x81\x02yo")

    def test_a_transport_failing_mid_broadcast_spares_the_others(self):
        """A recipient whose write raises does not stop delivery to the rest."""

        class ExplodingTransport(StringTransport):
            explode = False

            def write(self, data):
                if self.explode:
                    raise OSError("connection reset")
                super().write(data)

        ann, ann_t = self.connect()
        bad, bad_t = self.connect(transport=ExplodingTransport())
        bob, bob_t = self.connect()
        bad_t.explode = True
        ann_t.clear(), bob_t.clear()
        self.hub.publish_text(ann.id, "through")
        self.assertEqual(ann_t.value(), b"\x81\x07through")
        self.assertEqual(bob_t.value(), b"\x81\x07through")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_closing_connection_gets_no_data_frames(self):
        """After a close frame has been sent, broadcasts skip that client."""
        ann, ann_t = self.connect()
        self.addCleanup(ann.connectionLost, Failure(ConnectionDone()))
        ann.sendClose(1000)
        ann_t.clear()
        self.hub.publish_binary("t-9", b"late")
        self.assertEqual(ann_t.value(), b"")

    def test_lost_connection_leaves_no_close_timer(self):
        """A peer that drops TCP instead of answering our close frame leaves
        no close-handshake timer running."""
        ann, _ = self.connect()
        ann.sendClose(1000)
        self.assertIsNotNone(ann.closeHandshakeTimeoutCall)
        ann.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(ann.closeHandshakeTimeoutCall)
        self.assertEqual(len(self.hub), 0)

    def test_handshake_is_forgotten_once_open(self):
        """The request, headers and response of the handshake are dropped
        when the connection opens."""
        ann, _ = self.connect()
        for name in ("http_headers", "http_request_data", "http_response_data", "_wskey"):
            self.assertFalse(hasattr(ann, name), name)
        self.assertEqual(ann.websocket_version, 13)

    def test_open_connection_still_broadcasts_pongs_and_closes(self):
        """After the handshake is forgotten, a client's messages are
        broadcast, its ping is answered and its close is echoed."""
        ann, ann_t = self.connect()
        bob, bob_t = self.connect()
        ann_t.clear()
        bob.dataReceived(build_frame(OP_TEXT, b"yo"))
        self.assertEqual(ann_t.value(), b"\x81\x02yo")
        ann_t.clear()
        ann.dataReceived(build_frame(OP_PING, b"are you there"))
        self.assertEqual(ann_t.value(), b"\x8a\x0dare you there")
        ann_t.clear()
        ann.dataReceived(build_frame(OP_CLOSE, b"\x03\xe8"))
        self.assertEqual(ann_t.value(), b"\x88\x02\x03\xe8")
        self.assertTrue(ann_t.disconnecting)

    def test_slow_consumer_is_still_closed(self):
        """A client that stops reading is closed with 4008 once it is more
        than --max-buffer behind."""
        self.factory = BroadcastServerFactory(
            self.hub, OriginPolicy(), self.reactor, limits=Limits(max_buffer=10)
        )
        ann, ann_t = self.connect()
        self.addCleanup(ann.connectionLost, Failure(ConnectionDone()))
        ann_t.clear()
        ann_t.producer.pauseProducing()
        self.hub.publish_text(ann.id, "x" * 20)
        self.hub.publish_text(ann.id, "y" * 20)
        self.assertEqual(ann_t.value(), b"", "nothing is written while the transport is full")
        ann_t.producer.resumeProducing()
        # What waited for it is dropped; the close frame is all it gets.
        self.assertEqual(ann_t.value(), b"\x88\x1f\x0f\xa8slow consumer: too far behind")

    def test_options_live_on_the_protocol_class(self):
        """Autobahn's options are read from the factory's protocol class, not
        copied onto each connection; a connection keeps the options it was
        made with."""
        ann, _ = self.connect()
        self.assertNotIn("maxMessagePayloadSize", vars(ann))
        self.assertEqual(ann.maxMessagePayloadSize, 65536)
        # Its log lines are still the protocol module's.
        self.assertEqual(type(ann).__module__, "broadcaster.protocols.websocket")
        self.factory.setProtocolOptions(maxMessagePayloadSize=1000)
        bob, _ = self.connect()
        self.assertEqual(bob.maxMessagePayloadSize, 1000)
        self.assertEqual(ann.maxMessagePayloadSize, 65536)

    def test_slots_hide_no_class_attribute(self):
        """A slot named like a default that Autobahn or Twisted defines on a
        base class reads as that default on a protocol just made (reading
        it before it is set would raise otherwise)."""
        protocol = self.factory.protocol()
        for klass in BroadcastServerProtocol.__mro__:
            for name in vars(klass).get("__slots__", ()):
                for base in klass.__mro__[1:]:
                    if name in vars(base):
                        self.assertIs(getattr(protocol, name), vars(base)[name], name)
                        break
        self.assertIn("state", LeanWebSocketServerProtocol.__slots__)

    def test_an_idle_connection_has_no_instance_dict(self):
        """An open connection that has answered pings, sent messages and
        had its rate checked keeps all its state in slots."""
        ann, ann_t = self.connect(json_mode=True)
        bob, _ = self.connect()
        self.reactor.advance(25)
        for protocol in (ann, bob):
            protocol.dataReceived(build_frame(OP_PONG, b""))
        ann.dataReceived(build_frame(OP_TEXT, b'{"type": "message", "text": "hi"}'))
        bob.dataReceived(build_frame(OP_TEXT, b"hi"))
        self.assertEqual(ann_t.value().count(b'"text":"hi"'), 2)
        for protocol in (ann, bob):
            self.assertEqual(vars(protocol) if hasattr(protocol, "__dict__") else {}, {})

    def test_autobahn_futures_fire_for_those_who_ask(self):
        """is_open fires once the connection is open, whether asked for
        before or after; is_closed fires once it is closed."""
        early = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        opened = early.is_open
        transport = StringTransport()
        early.makeConnection(transport)
        self.assertNoResult(opened)
        early.dataReceived(handshake_request())
        self.assertIsNone(self.successResultOf(opened))
        late, _ = self.connect()
        self.assertIsNone(self.successResultOf(late.is_open))
        closed = late.is_closed
        self.assertNoResult(closed)
        late.dataReceived(build_frame(OP_CLOSE, close_payload(1000)))
        late.connectionLost(Failure(ConnectionDone()))
        self.assertIs(self.successResultOf(closed), late)
        early.connectionLost(Failure(ConnectionDone()))

    def test_connections_share_one_keepalive_timer(self):
        """Opening more connections schedules no more timers; a dead peer
        among them is dropped and the others are pinged on."""
        ann, ann_t = self.connect()
        calls = len(self.reactor.getDelayedCalls())
        others = [self.connect() for _ in range(5)]
        self.assertEqual(len(self.reactor.getDelayedCalls()), calls)
        for _, transport in others:
            transport.clear()
        self.reactor.advance(25)
        for protocol, transport in others:
            self.assertEqual(transport.value()[:1], b"\x89")
            transport.clear()
            protocol.dataReceived(build_frame(OP_PONG, b""))
        self.reactor.advance(10)
        self.assertTrue(ann_t.disconnecting)
        self.assertFalse(any(t.disconnecting for _, t in others))
        self.reactor.advance(15)
        for _, transport in others:
            self.assertEqual(transport.value()[:1], b"\x89")


class ShutdownIntegrationTests(TestCase):
    @inlineCallbacks
    def test_clients_get_going_away_on_shutdown(self):
        """Stopping the service sends every WebSocket client close code 1001
        and disconnects raw-TCP clients, then completes."""
        service, port = yield start_server(self)
        (ann, _), (bob, _) = yield connect_plain_clients(self, port, 2)
        nc = yield connect_raw(self, port_of(service.line_endpoint), LineClient)
        yield service.stopService()
        for client in (ann, bob):
            clean, code, reason = yield client.closed
            self.assertEqual((clean, code), (True, 1001))
        yield nc.closed
        self.assertEqual(len(service.hub), 0)
