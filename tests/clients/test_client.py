"""
Tests for :mod:`broadcaster.clients.cli`, the ``broadcaster-client`` script.

The options, the stdio console and the client protocol are tested with
fakes: a :class:`StringTransport` carrying a real Autobahn handshake and
hand-built frames, and a :class:`Clock`.  The main tests run the real script
as a subprocess against a real server on a loopback port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import List, Optional, Sequence, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

import broadcaster
from broadcaster.clients.cli import (
    EXIT_CANNOT_CONNECT,
    EXIT_CONNECTION,
    EXIT_HANDSHAKE,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    BroadcastClientFactory,
    ClientError,
    Console,
    Options,
)
from tests.support import (
    connect_client,
    free_port,
    run_module,
    self_signed_certificate,
    start_server,
    wait_for,
)

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _BINARY, _CLOSE = 0x1, 0x2, 0x8


def _parse(args: Sequence[str]) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    """
    Tests for :class:`broadcaster.clients.cli.Options`.
    """

    def test_defaults(self) -> None:
        """A bare URL means stdin mode, plain format, a 10 second timeout."""
        options = _parse(["ws://127.0.0.1:9999/"])
        self.assertEqual(options["url"], "ws://127.0.0.1:9999/")
        self.assertEqual(
            (options["url"].host, options["url"].port, options["url"].secure),
            ("127.0.0.1", 9999, False),
        )
        self.assertEqual(options["send"], None)
        self.assertEqual(options["count"], 1)
        self.assertEqual(options["timeout"], 10.0)
        self.assertFalse(options["json"])
        self.assertEqual(options["headers"], [])

    def test_wss_default_port(self) -> None:
        """A wss URL without a port means TLS to port 443."""
        url = _parse(["wss://chat.example.com/room?name=ann"])["url"]
        self.assertEqual((url.host, url.port, url.secure), ("chat.example.com", 443, True))

    def test_not_websocket_url(self) -> None:
        """An http URL is a usage error that names the URL and the schemes to use."""
        e = self.assertRaises(UsageError, _parse, ["http://x"])
        self.assertIn("http://x", str(e))
        self.assertIn("ws://", str(e))

    def test_url_required(self) -> None:
        """Leaving out the URL is a usage error that asks for one."""
        e = self.assertRaises(UsageError, _parse, [])
        self.assertIn("WebSocket URL", str(e))

    def test_bad_port(self) -> None:
        """A URL whose port is not a number is a usage error naming the URL."""
        e = self.assertRaises(UsageError, _parse, ["ws://localhost:http/"])
        self.assertIn("ws://localhost:http/", str(e))

    def test_send_count(self) -> None:
        """--send and --count are read as text and a positive integer."""
        options = _parse(["--send", "Hello", "--count", "3", "ws://h/"])
        self.assertEqual((options["send"], options["count"]), ("Hello", 3))

    def test_count_without_send(self) -> None:
        """--count without --send is a usage error naming both flags."""
        e = self.assertRaises(UsageError, _parse, ["--count", "3", "ws://h/"])
        self.assertIn("--count", str(e))
        self.assertIn("--send", str(e))

    def test_count_positive(self) -> None:
        """--count 0 is rejected."""
        self.assertRaises(UsageError, _parse, ["--send", "x", "--count", "0", "ws://h/"])

    def test_timeout_positive(self) -> None:
        """--timeout 0 is rejected."""
        self.assertRaises(UsageError, _parse, ["--timeout", "0", "ws://h/"])

    def test_headers(self) -> None:
        """--header is repeatable and split into name and value."""
        options = _parse(
            ["--header", "Authorization: Bearer abc", "-H", "X-Room:lobby", "ws://h/"]
        )
        self.assertEqual(
            options["headers"], [("Authorization", "Bearer abc"), ("X-Room", "lobby")]
        )

    def test_header_malformed(self) -> None:
        """A --header without 'Name:' is a usage error naming the flag."""
        e = self.assertRaises(UsageError, _parse, ["--header", "Authorization", "ws://h/"])
        self.assertIn("--header", str(e))

    def test_header_handshake_owned(self) -> None:
        """--header cannot replace headers the handshake is made of, nor Origin."""
        self.assertRaises(UsageError, _parse, ["--header", "Host: other", "ws://h/"])
        e = self.assertRaises(UsageError, _parse, ["--header", "Origin: http://o", "ws://h/"])
        self.assertIn("--origin", str(e))

    def test_cacert_needs_wss(self) -> None:
        """--cacert with a ws:// URL is a usage error naming the flag."""
        e = self.assertRaises(UsageError, _parse, ["--cacert", __file__, "ws://h/"])
        self.assertIn("--cacert", str(e))

    def test_cacert_unreadable(self) -> None:
        """A --cacert file that is not a PEM certificate is a usage error naming it."""
        e = self.assertRaises(UsageError, _parse, ["--cacert", __file__, "wss://h/"])
        self.assertIn("--cacert", str(e))
        self.assertIn(__file__, str(e))

    def test_origin(self) -> None:
        """--origin is passed on as given, even one that is not a valid origin."""
        self.assertEqual(_parse(["--origin", "null", "ws://h/"])["origin"], "null")


class ConsoleTests(SynchronousTestCase):
    """
    Tests for :class:`broadcaster.clients.cli.Console`.
    """

    def setUp(self) -> None:
        self.stdio = StringTransport()
        self.console = Console()
        self.console.makeConnection(self.stdio)
        self.lines: List[str] = []
        self.eof: List[bool] = []

    def test_not_reading_until_started(self) -> None:
        """Stdin is left unread until there is somewhere to send it."""
        self.assertEqual(self.stdio.producerState, "paused")
        self.console.start_reading(self.lines.append, lambda: self.eof.append(True))
        self.assertEqual(self.stdio.producerState, "producing")

    def test_lines(self) -> None:
        """Lines lose their LF or CRLF ending; the last, unterminated one comes at EOF."""
        self.console.start_reading(self.lines.append, lambda: self.eof.append(True))
        self.console.dataReceived(b"one\r\ntw")
        self.console.dataReceived("o\nth\u00e9".encode("utf-8"))
        self.assertEqual(self.lines, ["one", "two"])
        self.console.readConnectionLost()
        self.assertEqual((self.lines, self.eof), (["one", "two", "th\u00e9"], [True]))

    def test_print_line(self) -> None:
        """Printed text goes to stdout as UTF-8 with a newline."""
        self.console.print_line("caf\u00e9")
        self.assertEqual(self.stdio.value(), "caf\u00e9\n".encode("utf-8"))

    def test_finish(self) -> None:
        """finish() closes stdout and fires only once it is flushed and closed."""
        d = self.console.finish()
        self.assertTrue(self.stdio.disconnecting)
        self.assertNoResult(d)
        self.console.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.console.print_line("ignored")
        self.successResultOf(self.console.finish())


def _server_frame(payload: bytes, opcode: int = _TEXT) -> bytes:
    """A final, unmasked frame, as a server sends."""
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, size])
    elif size < 1 << 16:
        header = bytes([0x80 | opcode, 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 127]) + size.to_bytes(8, "big")
    return header + payload


def _client_frames(data: bytes) -> List[Tuple[int, bytes]]:
    """Unmask the frames a client wrote: a list of ``(opcode, payload)``."""
    frames = []
    while data:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        assert data[1] & 0x80, "client frames must be masked"
        offset = 2
        if size == 126:
            size, offset = int.from_bytes(data[2:4], "big"), 4
        elif size == 127:
            size, offset = int.from_bytes(data[2:10], "big"), 10
        mask, offset = data[offset : offset + 4], offset + 4
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[offset : offset + size]))
        frames.append((opcode, payload))
        data = data[offset + size :]
    return frames


class _TCPLikeTransport(StringTransport):
    """
    A :class:`StringTransport` that, like a TCP transport, lets Autobahn
    unregister a producer it never registered (it does when it drops a
    connection).
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class _Connection:
    """
    A :class:`BroadcastClientProtocol` over a :class:`StringTransport`, with
    the test playing the server.
    """

    def __init__(self, **settings) -> None:
        self.clock = Clock()
        self.stdio = StringTransport()
        self.console = Console()
        self.console.makeConnection(self.stdio)
        self.factory = BroadcastClientFactory(
            "ws://127.0.0.1:9999/", self.console, self.clock, **settings
        )
        # Autobahn schedules its own timers on the global reactor; these
        # tests end every connection themselves instead.
        self.factory.setProtocolOptions(
            openHandshakeTimeout=0, closeHandshakeTimeout=0, serverConnectionDropTimeout=0
        )
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9999))
        self.transport = _TCPLikeTransport()
        self.protocol.makeConnection(self.transport)
        self.request = self.transport.value().decode("latin-1")
        self.transport.clear()

    def header(self, name: str) -> Optional[str]:
        """A header of the handshake request the client sent."""
        for line in self.request.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def accept(self, subprotocol: Optional[str] = None) -> None:
        """Answer the handshake with 101, choosing ``subprotocol``."""
        key = self.header("Sec-WebSocket-Key").encode("ascii")
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode("ascii")
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n".format(accept)
        )
        if subprotocol is not None:
            response += "Sec-WebSocket-Protocol: {}\r\n".format(subprotocol)
        self.protocol.dataReceived((response + "\r\n").encode("ascii"))

    def send(self, message, binary: bool = False) -> None:
        """Send a message as the server: text, bytes, or an object as JSON."""
        if isinstance(message, dict):
            message = json.dumps(message)
        if isinstance(message, str):
            message = message.encode("utf-8")
        self.protocol.dataReceived(_server_frame(message, _BINARY if binary else _TEXT))

    def sent(self) -> List[Tuple[int, bytes]]:
        """The frames the client has sent since the last call."""
        frames = _client_frames(self.transport.value())
        self.transport.clear()
        return frames

    def close(self, code: int = 1000) -> None:
        """Send a close frame as the server and drop TCP, as servers do."""
        self.protocol.dataReceived(_server_frame(code.to_bytes(2, "big"), _CLOSE))
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def printed(self) -> List[str]:
        """What the client has printed on stdout."""
        return self.stdio.value().decode("utf-8").splitlines()


def _texts(frames: List[Tuple[int, bytes]]) -> List[str]:
    return [payload.decode("utf-8") for opcode, payload in frames if opcode == _TEXT]


def _close_code(frames: List[Tuple[int, bytes]]) -> Optional[int]:
    for opcode, payload in frames:
        if opcode == _CLOSE:
            return int.from_bytes(payload[:2], "big")
    return None


class BroadcastClientProtocolTests(SynchronousTestCase):
    """
    Tests for :class:`broadcaster.clients.cli.BroadcastClientProtocol`.
    """

    def test_handshake_headers(self) -> None:
        """The handshake carries --origin, --header, our User-Agent and no subprotocol."""
        c = _Connection(origin="http://evil.example", headers=[("Authorization", "Bearer t")])
        self.assertEqual(c.header("Origin"), "http://evil.example")
        self.assertEqual(c.header("Authorization"), "Bearer t")
        self.assertEqual(c.header("User-Agent"), "broadcaster-client/" + broadcaster.__version__)
        self.assertIsNone(c.header("Sec-WebSocket-Protocol"))

    def test_send_waits_for_echoes(self) -> None:
        """
        --send sends numbered texts, prints all it receives, and closes with 1000 once they
        are all back.
        """
        c = _Connection(texts=["Hello 0", "Hello 1"])
        c.accept()
        self.assertEqual(_texts(c.sent()), ["Hello 0", "Hello 1"])
        for text in ["n-1 connected", "Hello 0", "Hello 0", "other"]:
            c.send(text)
        self.assertEqual(c.sent(), [])
        c.send("Hello 1")
        self.assertEqual(_close_code(c.sent()), 1000)
        self.assertNoResult(c.protocol.finished)
        c.close()
        self.successResultOf(c.protocol.finished)
        self.assertEqual(
            c.printed(), ["n-1 connected", "Hello 0", "Hello 0", "other", "Hello 1"]
        )

    def test_binary_plain(self) -> None:
        """A binary message is printed as its size."""
        c = _Connection(texts=["x 0"])
        c.accept()
        c.send(b"\x00\x01\x02", binary=True)
        self.assertEqual(c.printed(), ["<binary 3 bytes>"])

    def test_others_cannot_drive_the_terminal(self) -> None:
        """What others send is printed with its control characters as
        escapes: an escape sequence retitling the terminal, a CR that would
        overwrite the line, a forged second line, a bidi override."""
        c = _Connection(texts=["x 0"])
        c.accept()
        c.send("n-1: \x1b]0;pwned\x07hi\rfake\nn-2: forged\u202e\tok")
        self.assertEqual(
            c.printed(), ["n-1: \\x1b]0;pwned\\x07hi\\x0dfake\\x0an-2: forged\\u202e\tok"]
        )

    def test_json_lines_cannot_drive_the_terminal(self) -> None:
        """In JSON mode the controls JSON would leave raw (DEL, C1, line
        separators, bidi) are \\u escapes: the same JSON, safe to print."""
        c = _Connection(json=True, texts=["x 0"])
        c.accept("broadcaster.json")
        event = {"type": "message", "from": "n-1", "text": "a\x1b[2Jb\x9bc\u2028d\u202ee"}
        c.send(event)
        (line,) = c.printed()
        self.assertNotRegex(line, "[\x00-\x1f\x7f-\x9f\u2028\u202e]")
        self.assertEqual(json.loads(line), event)

    def test_raw_prints_as_sent(self) -> None:
        """--raw, for pipes, prints what was sent as it is."""
        c = _Connection(texts=["x 0"], raw=True)
        c.accept()
        c.send("n-1: \x1b[31mred\x1b[0m")
        self.assertEqual(c.printed(), ["n-1: \x1b[31mred\x1b[0m"])

    def test_send_timeout(self) -> None:
        """
        If the echoes do not all come back in time the client still closes with 1000, then
        fails with the timeout status.
        """
        c = _Connection(texts=["Hello 0", "Hello 1"], timeout=3.0)
        c.accept()
        c.sent()
        c.send("Hello 0")
        c.clock.advance(2.9)
        self.assertEqual(c.sent(), [])
        c.clock.advance(0.1)
        self.assertEqual(_close_code(c.sent()), 1000)
        c.close()
        e = self.failureResultOf(c.protocol.finished, ClientError).value
        self.assertEqual(e.exit_status, EXIT_TIMEOUT)
        self.assertIn("1 of our 2", str(e))

    def test_json_echoes(self) -> None:
        """
        In JSON mode the client sends message objects and counts only message events from
        its own id.
        """
        c = _Connection(json=True, texts=["hi 0", "hi 1"])
        self.assertEqual(c.header("Sec-WebSocket-Protocol"), "broadcaster.json")
        c.accept("broadcaster.json")
        self.assertEqual(
            [json.loads(t) for t in _texts(c.sent())],
            [{"type": "message", "text": "hi 0"}, {"type": "message", "text": "hi 1"}],
        )
        c.send({"type": "welcome", "id": "n-2", "members": [{"id": "n-1"}, {"id": "n-2"}]})
        c.send({"type": "message", "from": "n-1", "text": "hi 0", "ts": 1.0})
        c.send({"type": "message", "from": "n-1", "text": "hi 1", "ts": 1.0})
        c.send({"type": "binary", "from": "n-1", "size": 2, "ts": 1.0})
        c.send(b"\xff\xfe", binary=True)
        c.send({"type": "message", "from": "n-2", "text": "hi 0", "ts": 1.0})
        self.assertEqual(c.sent(), [])
        c.send({"type": "message", "from": "n-2", "text": "hi 1", "ts": 1.0})
        self.assertEqual(_close_code(c.sent()), 1000)
        c.close()
        self.successResultOf(c.protocol.finished)
        events = [json.loads(line) for line in c.printed()]
        self.assertEqual(
            [e["type"] for e in events],
            ["welcome", "message", "message", "binary", "message", "message"],
        )

    def test_json_refused_by_server(self) -> None:
        """
        A server that does not pick the JSON subprotocol ends a --json run with the
        handshake status.
        """
        c = _Connection(json=True, texts=["hi 0"])
        c.accept()
        self.assertEqual(_close_code(c.sent()), 1000)
        c.close()
        e = self.failureResultOf(c.protocol.finished, ClientError).value
        self.assertEqual(e.exit_status, EXIT_HANDSHAKE)
        self.assertIn("broadcaster.json", str(e))

    def test_stdin_lines(self) -> None:
        """
        In stdin mode each line is sent once the connection is open, and EOF closes it with
        1000.
        """
        c = _Connection()
        self.assertEqual(c.stdio.producerState, "paused")
        c.accept()
        self.assertEqual(c.stdio.producerState, "producing")
        c.console.dataReceived(b"one\ntwo")
        self.assertEqual(_texts(c.sent()), ["one"])
        c.console.readConnectionLost()
        frames = c.sent()
        self.assertEqual((_texts(frames), _close_code(frames)), (["two"], 1000))
        c.close()
        self.successResultOf(c.protocol.finished)

    def test_server_closes_normally(self) -> None:
        """In stdin mode a normal close by the server is a clean finish."""
        c = _Connection()
        c.accept()
        c.close(1000)
        self.assertEqual(_close_code(c.sent()), 1000)
        self.successResultOf(c.protocol.finished)

    def test_server_closes_with_error(self) -> None:
        """
        A close by the server with another code fails with the connection status and the
        code.
        """
        c = _Connection()
        c.accept()
        c.close(1009)
        e = self.failureResultOf(c.protocol.finished, ClientError).value
        self.assertEqual(e.exit_status, EXIT_CONNECTION)
        self.assertIn("1009", str(e))

    def test_connection_lost(self) -> None:
        """A connection dropped without a close handshake fails with the connection status."""
        c = _Connection(texts=["x 0"])
        c.accept()
        c.protocol.connectionLost(Failure(ConnectionLost()))
        e = self.failureResultOf(c.protocol.finished, ClientError).value
        self.assertEqual(e.exit_status, EXIT_CONNECTION)
        self.assertIn("ws://127.0.0.1:9999/", str(e))

    def test_handshake_refused(self) -> None:
        """An HTTP error answer to the handshake fails with its status and reason."""
        c = _Connection()
        c.protocol.dataReceived(b"HTTP/1.1 403 Origin not allowed\r\n\r\n")
        self.assertTrue(c.transport.disconnecting)
        c.protocol.connectionLost(Failure(ConnectionDone()))
        e = self.failureResultOf(c.protocol.finished, ClientError).value
        self.assertEqual(e.exit_status, EXIT_HANDSHAKE)
        self.assertIn("handshake refused: 403 Origin not allowed", str(e))
        self.assertEqual(c.stdio.producerState, "paused")

    def test_no_handshake_answer(self) -> None:
        """A connection closed before any HTTP answer means the client could not connect."""
        c = _Connection()
        c.protocol.connectionLost(Failure(ConnectionDone()))
        e = self.failureResultOf(c.protocol.finished, ClientError).value
        self.assertEqual(e.exit_status, EXIT_CANNOT_CONNECT)


def run_client(testcase, args: Sequence[str], stdin: bytes = b"") -> Deferred:
    """
    Run the client script on this checkout, killing it if it is still
    running when ``testcase`` ends.

    :return: a Deferred firing with ``(stdout, stderr, exit_status)``.
    """
    return run_module(testcase, "broadcaster.clients.cli", args, stdin).ended()


class ClientScriptTests(TestCase):
    """
    Tests for ``python -m broadcaster.clients.cli`` against a real server.
    """

    @inlineCallbacks
    def _observed_session(self, args: Sequence[str], stdin: bytes = b""):
        """
        Run the client while another client watches the server.

        :return: a Deferred firing with the client's result, the client's id,
            what the watcher saw it send, and the server's disconnect event
            for it.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, port = yield start_server(self)
        watcher = yield connect_client(self, port)
        yield watcher.next_text()  # our own "<id> connected"
        members_before = len(service.hub)
        url = "ws://127.0.0.1:{}/".format(port)
        result = yield run_client(self, [*args, url], stdin=stdin)
        joined = yield watcher.next_text()
        self.assertTrue(joined.endswith(" connected"), joined)
        client_id = joined.split()[0]
        heard = []
        while True:
            text = yield watcher.next_text()
            if text == "{} disconnected".format(client_id):
                break
            heard.append(text)
        yield wait_for(lambda: len(service.hub) == members_before, what="client to leave")
        disconnect = yield wait_for(
            lambda: [e for e in events if e.get("client") == client_id and "clean" in e],
            what="the server to log the disconnect",
        )
        return result, client_id, heard, disconnect[0]

    @inlineCallbacks
    def test_send_count(self) -> None:
        """
        --send Hello --count 3 sends three numbered messages, prints their echoes, and
        closes cleanly with 1000.
        """
        (out, err, status), client_id, heard, disconnect = yield self._observed_session(
            ["--send", "Hello", "--count", "3"]
        )
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], "{} connected".format(client_id))
        self.assertEqual(lines[1:], ["Hello 0", "Hello 1", "Hello 2"])
        self.assertEqual(heard, ["Hello 0", "Hello 1", "Hello 2"])
        self.assertEqual((disconnect["code"], disconnect["clean"]), (1000, True))

    @inlineCallbacks
    def test_stdin(self) -> None:
        """Each stdin line is sent as a message, and EOF closes the connection cleanly."""
        (out, err, status), _, heard, disconnect = yield self._observed_session(
            [], stdin="first line\nsecond, caf\u00e9\n".encode("utf-8")
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(heard, ["first line", "second, caf\u00e9"])
        self.assertEqual((disconnect["code"], disconnect["clean"]), (1000, True))

    @inlineCallbacks
    def test_json(self) -> None:
        """
        --json prints each event as one JSON line: the welcome, then our messages coming
        back.
        """
        (out, err, status), client_id, heard, disconnect = yield self._observed_session(
            ["--json", "--send", "hi", "--count", "2"]
        )
        self.assertEqual((status, err), (0, ""))
        events = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(events[0]["type"], "welcome")
        self.assertEqual(events[0]["id"], client_id)
        self.assertEqual(
            [(e["from"], e["text"]) for e in events if e["type"] == "message"],
            [(client_id, "hi 0"), (client_id, "hi 1")],
        )
        self.assertEqual(heard, ["hi 0", "hi 1"])
        self.assertEqual((disconnect["code"], disconnect["clean"]), (1000, True))

    @inlineCallbacks
    def test_connection_refused(self) -> None:
        """With nothing listening the client exits 1, naming the URL on stderr."""
        url = "ws://127.0.0.1:{}/".format(free_port())
        out, err, status = yield run_client(self, ["--send", "x", url])
        self.assertEqual((out, status), ("", EXIT_CANNOT_CONNECT))
        self.assertIn("cannot connect to {}".format(url), err)
        self.assertEqual(len(err.splitlines()), 1, err)

    @inlineCallbacks
    def test_handshake_refused(self) -> None:
        """
        A foreign --origin is refused with 403, which the client reports with its own exit
        status.
        """
        service, port = yield start_server(self)
        url = "ws://127.0.0.1:{}/".format(port)
        out, err, status = yield run_client(self, ["--origin", "http://evil.example", url])
        self.assertEqual((out, status), ("", EXIT_HANDSHAKE))
        self.assertIn("{}: handshake refused: 403".format(url), err)
        self.assertEqual(sum(service.hub.stats.refused_handshakes.values()), 1)

    @inlineCallbacks
    def test_bad_url(self) -> None:
        """An http URL is a usage error: exit 2 and a message naming the URL."""
        out, err, status = yield run_client(self, ["http://x"])
        self.assertEqual((out, status), ("", EXIT_USAGE))
        self.assertIn("'http://x' is not a WebSocket URL", err)

    @inlineCallbacks
    def test_wss(self) -> None:
        """
        Over wss the server's certificate is verified: a self-signed one is
        refused unless given with --cacert.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        key, cert = self_signed_certificate(directory)
        _, port = yield start_server(
            self,
            ["--port", "ssl:0:interface=127.0.0.1:privateKey={}:certKey={}".format(key, cert)],
        )
        url = "wss://127.0.0.1:{}/".format(port)
        out, err, status = yield run_client(self, ["--send", "tls", url])
        self.assertEqual((out, status), ("", EXIT_CANNOT_CONNECT))
        self.assertIn("cannot connect to {}".format(url), err)
        self.assertIn("certificate verify failed", err)
        out, err, status = yield run_client(self, ["--cacert", cert, "--send", "tls", url])
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out.splitlines()[1:], ["tls 0"])


class OptionOrderTests(SynchronousTestCase):
    def test_options_may_follow_the_url(self):
        """'broadcaster-client URL --send Hello --count 3' works like options first."""
        options = Options()
        options.parseOptions(["ws://127.0.0.1:9999/", "--send", "Hello", "-n", "3", "--json"])
        self.assertEqual(
            (options["url"], options["send"], options["count"], options["json"]),
            ("ws://127.0.0.1:9999/", "Hello", 3, True),
        )
