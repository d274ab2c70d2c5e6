"""
Tests for :mod:`broadcaster.protocols.lines`, the line bridge: unit tests over
in-memory transports, and real sockets chatting with WebSocket clients.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.core.events import TextMessage
from broadcaster.protocols.lines import LineBridgeFactory, as_line
from broadcaster.core.members import MemberBase
from tests.support import (
    immediate_hub,
    LineClient,
    connect_client,
    connect_raw,
    port_of,
    start_server,
)


class Recorder(MemberBase):
    id = "recorder"
    name = None

    def __init__(self):
        self.texts = []

    def deliver(self, event):
        if isinstance(event, TextMessage):
            self.texts.append((event.sender, event.text))


class LineBridgeProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.hub = immediate_hub(self.clock, node_id="t")
        self.recorder = Recorder()
        self.hub.connect(self.recorder)
        self.factory = LineBridgeFactory(self.hub, self.clock, max_line_length=16)
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.transport.clear()
        self.addCleanup(self.protocol.connectionLost, Failure(ConnectionDone()))

    def test_lf_and_crlf_lines_are_broadcast(self):
        """Each line, ended by LF or CRLF, is one message without its line end."""
        self.protocol.dataReceived(b"one\ntwo\r\nthr")
        self.protocol.dataReceived(b"ee\n")
        self.assertEqual(
            [t for _, t in self.recorder.texts], ["one", "two", "three"]
        )
        self.assertEqual({s for s, _ in self.recorder.texts}, {self.protocol.id})

    def test_utf8_is_decoded(self):
        """Lines are UTF-8 text."""
        self.protocol.dataReceived("caf\u00e9 \u2603\n".encode("utf-8"))
        self.assertEqual(self.recorder.texts[-1][1], "caf\u00e9 \u2603")

    def test_blank_lines_are_ignored(self):
        """An empty or all-blank line broadcasts nothing."""
        self.protocol.dataReceived(b"\n   \r\n")
        self.assertEqual(self.recorder.texts, [])

    def test_invalid_utf8_is_refused_and_the_connection_stays(self):
        """A line that is not UTF-8 gets ERROR back and a warning; the next line goes through."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.protocol.dataReceived(b"bad \xff\xfe\nfine\n")
        self.assertEqual(self.recorder.texts, [(self.protocol.id, "fine")])
        self.assertTrue(self.transport.value().startswith(b"ERROR "))
        self.assertIn(b"UTF-8", self.transport.value())
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len([e for e in logged if e["log_level"] == LogLevel.warn]), 1)

    def test_overlong_line_is_refused_and_the_connection_stays(self):
        """A complete line over the limit gets ERROR back and is not broadcast."""
        self.protocol.dataReceived(b"x" * 17 + b"\nok\n")
        self.assertEqual(self.recorder.texts, [(self.protocol.id, "ok")])
        self.assertIn(b"longer than the limit of 16", self.transport.value())
        self.assertFalse(self.transport.disconnecting)

    def test_line_at_the_limit_is_accepted(self):
        """A line of exactly the limit is fine."""
        self.protocol.dataReceived(b"y" * 16 + b"\r\n")
        self.assertEqual(self.recorder.texts, [(self.protocol.id, "y" * 16)])

    def test_no_newline_within_the_limit_closes(self):
        """More than the limit without any line end gets ERROR and a close."""
        self.protocol.dataReceived(b"z" * 10)
        self.protocol.dataReceived(b"z" * 10)
        self.assertTrue(self.transport.value().startswith(b"ERROR "))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.recorder.texts, [])

    def test_messages_become_single_lines(self):
        """Line breaks inside a message are replaced so one message is one line."""
        self.hub.publish_text("recorder", "a\nb\r\nc\u2028d")
        self.assertEqual(self.transport.value(), b"recorder: a b c d\n")

    def test_no_control_reaches_the_terminal(self):
        """ESC, backspace, BEL, DEL, C1 controls and bidi overrides in a
        message are written as escapes: another user cannot retitle an nc
        user's terminal or rewrite what it shows.  Tab stays."""
        self.hub.publish_text("recorder", "\x1b]0;owned\x07x\x08\x7f\x9b\u202e\ty")
        self.assertEqual(
            self.transport.value(),
            b"recorder: \\x1b]0;owned\\x07x\\x08\\x7f\\x9b\\u202e\ty\n",
        )

    def test_an_http_request_is_not_chat(self):
        """A first line that is an HTTP request line closes the connection
        with one ERROR line; nothing after it is posted.  Later lines that
        look like one are chat like any other."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5002))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.clear()
        protocol.dataReceived(b"POST /submit HTTP/1.1\r\nHost: localhost\r\n\r\nspam\n")
        self.assertEqual(
            transport.value(), b"ERROR this is the line bridge, not an HTTP server; closing\n"
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.recorder.texts, [])
        self.protocol.dataReceived(b"hi\nGET / HTTP/1.1\n")
        self.assertEqual(
            [text for _, text in self.recorder.texts][-2:], ["hi", "GET / HTTP/1.1"]
        )

    def test_announcements_are_lines(self):
        """Arrivals and departures arrive as '<id> connected' / '<id> disconnected'."""
        other = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5001))
        other.makeConnection(StringTransport())
        other.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.transport.value().decode().splitlines(),
            ["{} connected".format(other.id), "{} disconnected".format(other.id)],
        )

    def test_binary_is_not_sent_to_line_clients(self):
        """Binary messages have no line form."""
        self.hub.publish_binary("t-9", b"\x00\x01")
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNone(as_line(self.hub.publish_binary("t-9", b"x")))


class LineBridgeIntegrationTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.service, self.web_port = yield start_server(self)
        self.line_port = port_of(self.service.line_endpoint)

    @inlineCallbacks
    def test_chat_both_ways_with_websocket_clients(self):
        """A netcat-style client and WebSocket clients see each other's messages."""
        plain = yield connect_client(self, self.web_port)
        plain_id = (yield plain.next_text()).split()[0]
        js = yield connect_client(self, self.web_port, json_mode=True)
        yield js.next_json()
        yield js.next_json()
        yield plain.next_text()
        nc = yield connect_raw(self, self.line_port, LineClient)
        nc_id = (yield nc.next()).split()[0]
        self.assertEqual((yield plain.next_text()), "{} connected".format(nc_id))
        self.assertEqual((yield js.next_json())["id"], nc_id)

        nc.transport.write(b"hello from nc\r\n")
        self.assertEqual((yield plain.next_text()), "hello from nc")
        event = yield js.next_json()
        self.assertEqual((event["from"], event["text"]), (nc_id, "hello from nc"))
        self.assertEqual((yield nc.next()), "{}: hello from nc".format(nc_id))

        plain.send_text("two\nlines")
        self.assertEqual((yield nc.next()), "{}: two lines".format(plain_id))

        plain.send_text("ERROR you are banned")
        self.assertEqual((yield nc.next()), "{}: ERROR you are banned".format(plain_id))

        plain.sendClose()
        self.assertEqual((yield nc.next()), "{} disconnected".format(plain_id))

    @inlineCallbacks
    def test_bad_lines_answered_and_others_unaffected(self):
        """Invalid UTF-8 and overlong lines get ERROR; the client and others carry on."""
        service, web_port = yield start_server(self, ["--max-line-length", "1000"])
        self.line_port = port_of(service.line_endpoint)
        plain = yield connect_client(self, web_port)
        yield plain.next_text()
        nc = yield connect_raw(self, self.line_port, LineClient)
        yield nc.next()
        yield plain.next_text()
        nc.transport.write(b"\xc3\x28\n" + b"a" * 1001 + b"\nstill ok\n")
        self.assertTrue((yield nc.next()).startswith("ERROR "))
        self.assertTrue((yield nc.next()).startswith("ERROR "))
        self.assertTrue((yield nc.next()).endswith(": still ok"))
        self.assertEqual((yield plain.next_text()), "still ok")

    @inlineCallbacks
    def test_endless_line_gets_its_error_before_the_hang_up(self):
        """A client that keeps sending without a line end reads the ERROR,
        then the server hangs up; nobody else is affected."""
        service, web_port = yield start_server(self, ["--max-line-length", "1000"])
        plain = yield connect_client(self, web_port)
        yield plain.next_text()
        flood = yield connect_raw(self, port_of(service.line_endpoint), LineClient)
        yield flood.next()
        yield plain.next_text()
        for _ in range(50):
            flood.transport.write(b"x" * 10000)
        self.assertIn("no line end within 1000 bytes", (yield flood.next()))
        yield flood.closed
        flood_id = flood.inbox.items[0].split()[0]
        self.assertEqual((yield plain.next_text()), "{} disconnected".format(flood_id))
        plain.send_text("fine")
        self.assertEqual((yield plain.next_text()), "fine")


class LineBridgeLimitTests(SynchronousTestCase):
    def setUp(self):
        from broadcaster.core.flow import Limits

        self.clock = Clock()
        self.hub = immediate_hub(self.clock, node_id="t")
        self.recorder = Recorder()
        self.hub.connect(self.recorder)
        self.factory = LineBridgeFactory(
            self.hub, self.clock, 100, Limits(rate=1, burst=2, max_buffer=50)
        )

    def connect(self):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.clear()
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return protocol, transport

    def test_excess_lines_are_refused_then_the_flooder_closed(self):
        """Lines over --rate get ERROR and are dropped; flooding on closes the client."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"1\n2\n3\n4\n")
        self.assertEqual([t for _, t in self.recorder.texts], ["1", "2"])
        self.assertIn(b"ERROR rate limit exceeded", transport.value())
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"5\n6\n7\n")
        self.assertTrue(transport.disconnecting)
        self.clock.advance(10)
        self.assertEqual(len(self.recorder.texts), 2)

    def test_slow_reader_is_disconnected(self):
        """A line client that stops reading is dropped once --max-buffer bytes are waiting for it."""
        protocol, transport = self.connect()
        protocol._outbound.pauseProducing()
        for i in range(10):
            self.hub.publish_text("recorder", "message number {}".format(i))
        self.assertTrue(transport.disconnected)
        self.assertLess(len(transport.value()), 50 + 40)
