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
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import FailTest, SynchronousTestCase, TestCase

import broadcaster
from broadcaster.clients.backoff import Backoff
from broadcaster.clients.cli import (
    EXIT_CANNOT_CONNECT,
    EXIT_CONNECTION,
    EXIT_HANDSHAKE,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    BroadcastClientFactory,
    ClientError,
    Console,
    Options,
    Session,
)
from broadcaster.clients.recovery import Positions
from tests.http.test_tokens import SECRET, hs256, live_claims
from tests.support import (
    connect_client,
    free_port,
    run_module,
    self_signed_certificate,
    start_server,
    start_twistd,
    wait_for,
)
from tests.test_rooms import join_chat, of_type, read_until

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

    def test_rooms(self) -> None:
        """--room is repeatable; --to names where messages go, the lobby by default."""
        options = _parse(["--json", "--room", "dev", "--room", "ops", "--to", "news", "ws://h/"])
        self.assertEqual((options["rooms"], options["to"]), (["dev", "ops"], "news"))
        self.assertEqual(_parse(["--json", "ws://h/"])["to"], "lobby")

    def test_rooms_need_json(self) -> None:
        """--room and --to in plain mode, which has only the lobby, are usage errors."""
        for flag in ("--room", "--to"):
            e = self.assertRaises(UsageError, _parse, [flag, "dev", "ws://h/"])
            self.assertIn(flag, str(e))
            self.assertIn("--json", str(e))

    def test_bad_room(self) -> None:
        """A room name the server would refuse is a usage error naming the flag."""
        for flag in ("--room", "--to"):
            e = self.assertRaises(UsageError, _parse, ["--json", flag, "no spaces", "ws://h/"])
            self.assertIn(flag, str(e))

    def test_name(self) -> None:
        """--name is added to the URL's query, encoded, its other parameters kept."""
        url = _parse(["--name", "Ann B\u00e9", "ws://h:1/chat?x=1&name=old"])["url"]
        self.assertEqual(url, "ws://h:1/chat?x=1&name=Ann+B%C3%A9")
        self.assertEqual((url.host, url.port), ("h", 1))

    def test_token(self) -> None:
        """--token sends a Bearer Authorization header."""
        options = _parse(["--token", "a.b.c", "ws://h/"])
        self.assertEqual(options["headers"], [("Authorization", "Bearer a.b.c")])

    def test_token_file(self) -> None:
        """--token-file reads the token, without its line end, from a file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("a.b.c\n")
        options = _parse(["--token-file", path, "ws://h/"])
        self.assertEqual(options["headers"], [("Authorization", "Bearer a.b.c")])

    def test_token_file_unusable(self) -> None:
        """A missing token file, or one that is not one word, is a usage error
        naming the flag, never quoting what the file holds."""
        e = self.assertRaises(UsageError, _parse, ["--token-file", self.mktemp(), "ws://h/"])
        self.assertIn("--token-file", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("secret-part other-part\n")
        e = self.assertRaises(UsageError, _parse, ["--token-file", path, "ws://h/"])
        self.assertIn("--token-file", str(e))
        self.assertNotIn("secret-part", str(e))

    def test_token_conflicts(self) -> None:
        """One token: --token with --token-file or an Authorization --header is a usage error."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("t")
        for args in (
            ["--token", "t", "--token-file", path],
            ["--token", "t", "--header", "Authorization: Basic x"],
        ):
            self.assertRaises(UsageError, _parse, args + ["ws://h/"])

    def test_reconnect(self) -> None:
        """--reconnect waits at most 30 s between attempts unless --reconnect-max says."""
        self.assertEqual(_parse(["--reconnect", "ws://h/"])["reconnect-max"], 30.0)
        options = _parse(["--reconnect", "--reconnect-max", "2.5", "ws://h/"])
        self.assertEqual((options["reconnect"], options["reconnect-max"]), (True, 2.5))

    def test_reconnect_misused(self) -> None:
        """--reconnect-max without --reconnect, and --reconnect with --send, are usage errors."""
        e = self.assertRaises(UsageError, _parse, ["--reconnect-max", "2", "ws://h/"])
        self.assertIn("--reconnect", str(e))
        e = self.assertRaises(UsageError, _parse, ["--reconnect", "--send", "x", "ws://h/"])
        self.assertIn("--send", str(e))


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

    def __init__(
        self,
        url: str = "ws://127.0.0.1:9999/",
        clock: Optional[Clock] = None,
        console: Optional[Console] = None,
        **settings,
    ) -> None:
        """
        :param clock: and ``console``: those of earlier connections of the
            same run (by default new ones).
        """
        self.clock = clock if clock is not None else Clock()
        if console is None:
            console = Console()
            console.makeConnection(StringTransport())
        self.console = console
        self.stdio = console.transport
        self.factory = BroadcastClientFactory(url, self.console, self.clock, **settings)
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

    def requests(self) -> List[dict]:
        """The JSON requests the client has sent since the last call."""
        return [json.loads(text) for text in _texts(self.sent())]


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
        # Nothing is sent before the welcome, always the first event.
        self.assertEqual(c.sent(), [])
        c.send({"type": "welcome", "id": "n-2", "members": [{"id": "n-1"}, {"id": "n-2"}]})
        self.assertEqual(
            c.requests(),
            [{"type": "message", "text": "hi 0"}, {"type": "message", "text": "hi 1"}],
        )
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


_URL = "ws://127.0.0.1:9999/"


class _Run:
    """
    A :class:`Session` whose connections are :class:`_Connection` objects,
    the test playing the server of each, on one :class:`Clock`.

    :ivar refusals: exceptions the next connection attempts fail with, as
        TCP would (connection refused), in order.
    """

    def __init__(
        self, rooms: Sequence[str] = (), json: bool = True, refusals: Sequence[Exception] = ()
    ) -> None:
        self.clock = Clock()
        self.console = Console()
        self.console.makeConnection(StringTransport())
        self.positions = Positions(rooms) if json else None
        self.json = json
        self.warnings: List[str] = []
        self.connections: List[_Connection] = []
        self.refusals = list(refusals)
        self.session = Session(
            self.clock,
            self.connect,
            _URL,
            self.console,
            positions=self.positions,
            # Waits of exactly half of each bound: 0.5, 1, 2, 4, 4...
            backoff=Backoff(initial=1.0, maximum=8.0, random=lambda: 0.5),
            warn=self.warnings.append,
        )
        self.session.start()

    def connect(self, url: str) -> Deferred:
        if self.refusals:
            return fail(self.refusals.pop(0))
        c = _Connection(
            url,
            clock=self.clock,
            console=self.console,
            json=self.json,
            positions=self.positions,
            reconnect=True,
            warn=self.warnings.append,
        )
        self.connections.append(c)
        return succeed(c.protocol)

    @property
    def last(self) -> _Connection:
        return self.connections[-1]

    def welcome(self, epoch: str, seq: int) -> List[dict]:
        """
        Open the last connection and welcome it to the lobby at ``epoch``
        and ``seq``.

        :return: the requests the client sent in answer.
        """
        self.last.accept("broadcaster.json" if self.json else None)
        self.last.send({"type": "welcome", "id": "n-1", "epoch": epoch, "seq": seq})
        return self.last.requests()

    def drop(self) -> None:
        """Lose the last connection without a close handshake."""
        self.last.protocol.connectionLost(Failure(ConnectionLost()))

    def texts(self) -> List[Tuple[str, str]]:
        """``(room, text)`` of every message event printed."""
        events = [json.loads(line) for line in self.last.printed()]
        return [(e["room"], e["text"]) for e in events if e["type"] == "message"]


def _message(room: str, epoch: str, seq: int, text: str) -> dict:
    return {"type": "message", "room": room, "epoch": epoch, "seq": seq, "text": text, "from": "n-9"}


class SessionTests(SynchronousTestCase):
    """
    Tests for :class:`broadcaster.clients.cli.Session`: reconnecting.
    """

    def test_reconnects_and_recovers_each_room_once(self) -> None:
        """
        After a drop the session waits as the backoff says, reconnects with
        the lobby's since in the URL and each room's in its join, says so on
        stderr, and prints a replayed message it had printed before only once.
        """
        run = _Run(rooms=["dev"])
        self.assertEqual(run.welcome("e1", 4), [{"type": "join", "room": "dev"}])
        run.last.send({"type": "presence", "room": "dev", "epoch": "e2", "seq": 0})
        run.last.send(_message("dev", "e2", 1, "one"))
        run.drop()
        self.assertEqual(run.console.transport.producerState, "paused")
        run.clock.advance(0.25)
        self.assertEqual(len(run.connections), 1)
        run.clock.advance(0.25)
        self.assertEqual(run.last.factory.url, _URL + "?since=e1%3A4")
        self.assertEqual(
            run.welcome("e1", 5),
            [{"type": "join", "room": "dev", "since": {"epoch": "e2", "seq": 1}}],
        )
        self.assertEqual(run.console.transport.producerState, "producing")
        self.assertEqual(run.warnings, ["reconnected after 0.5 s (attempt 1)"])
        for event in [
            _message("lobby", "e1", 5, "missed"),
            {"type": "recovered", "room": "lobby", "complete": True},
            {"type": "presence", "room": "dev", "epoch": "e2", "seq": 2},
            _message("dev", "e2", 1, "one"),
            _message("dev", "e2", 2, "two"),
            {"type": "recovered", "room": "dev", "complete": True},
        ]:
            run.last.send(event)
        self.assertEqual(run.texts(), [("dev", "one"), ("lobby", "missed"), ("dev", "two")])
        self.assertEqual(len(run.warnings), 1)
        self.assertNoResult(run.session.finished)

    def test_incomplete_recovery(self) -> None:
        """
        A recovery the server could not complete is printed as it came and
        said on stderr; the next recovery asks from the new epoch, not from
        the lost one again.
        """
        run = _Run(rooms=["dev"])
        run.welcome("e1", 4)
        run.last.send({"type": "presence", "room": "dev", "epoch": "e2", "seq": 7})
        run.drop()
        run.clock.advance(0.5)
        run.welcome("f1", 0)
        for event in [
            {"type": "recovered", "room": "lobby", "complete": False},
            {"type": "presence", "room": "dev", "epoch": "f2", "seq": 0},
            {"type": "recovered", "room": "dev", "complete": False},
        ]:
            run.last.send(event)
        self.assertEqual(
            run.warnings[1:],
            [
                "recovery of room 'lobby' incomplete: some messages were lost",
                "recovery of room 'dev' incomplete: some messages were lost",
            ],
        )
        printed = [json.loads(line) for line in run.last.printed()]
        self.assertEqual(
            [e["complete"] for e in printed if e["type"] == "recovered"], [False, False]
        )
        run.drop()
        run.clock.advance(8)
        self.assertEqual(run.last.factory.url, _URL + "?since=f1%3A0")
        self.assertEqual(
            run.welcome("f1", 0),
            [{"type": "join", "room": "dev", "since": {"epoch": "f2", "seq": 0}}],
        )

    def test_waits_grow_until_a_connection_lasts(self) -> None:
        """
        Failed attempts wait longer each time (the backoff's bounds); once a
        connection has lasted the longest wait, the next drop starts short again.
        """
        run = _Run()
        run.welcome("e1", 0)
        run.drop()
        run.refusals = [ConnectionRefusedError()] * 3
        for wait in (0.5, 1.0, 2.0, 3.5):
            run.clock.advance(wait)
        self.assertEqual(len(run.connections), 1)
        run.clock.advance(0.5)
        run.welcome("e1", 0)
        self.assertEqual(run.warnings, ["reconnected after 7.5 s (attempt 4)"])
        run.clock.advance(8)
        run.drop()
        run.clock.advance(0.5)
        self.assertEqual(len(run.connections), 3)

    def test_a_normal_close_by_the_server_is_a_drop(self) -> None:
        """With --reconnect even a 1000 close from the server is made good."""
        run = _Run()
        run.welcome("e1", 0)
        run.last.close(1000)
        run.clock.advance(0.5)
        self.assertEqual(len(run.connections), 2)
        self.assertNoResult(run.session.finished)

    def test_plain_mode_reconnects_without_recovery(self) -> None:
        """Plain mode reconnects to the same URL: it has nothing to recover."""
        run = _Run(json=False)
        run.last.accept()
        self.assertEqual(run.console.transport.producerState, "producing")
        run.drop()
        run.clock.advance(0.5)
        run.last.accept()
        self.assertEqual(run.last.factory.url, _URL)
        self.assertEqual(run.warnings, ["reconnected after 0.5 s (attempt 1)"])

    def test_end_of_input_ends_the_run(self) -> None:
        """The end of stdin still closes with 1000 and ends the run cleanly."""
        run = _Run()
        run.welcome("e1", 0)
        run.console.readConnectionLost()
        self.assertEqual(_close_code(run.last.sent()), 1000)
        run.last.close()
        self.successResultOf(run.session.finished)

    def _ends(self, run: _Run, status: int) -> ClientError:
        """Check that ``run`` ended with ``status`` and makes no more connections."""
        e = self.failureResultOf(run.session.finished, ClientError).value
        self.assertEqual(e.exit_status, status)
        count = len(run.connections)
        run.clock.advance(1000)
        self.assertEqual(len(run.connections), count)
        return e

    def test_expelled_is_final(self) -> None:
        """A 4003 close (disconnected by the server) ends the run with status 4."""
        run = _Run()
        run.welcome("e1", 0)
        run.last.close(4003)
        self.assertIn("4003", str(self._ends(run, EXIT_CONNECTION)))

    def test_token_expired_is_final(self) -> None:
        """A 4001 close (token expired) ends the run: the same token would be refused."""
        run = _Run()
        run.welcome("e1", 0)
        run.last.close(4001)
        self.assertIn("the token expired", str(self._ends(run, EXIT_CONNECTION)))

    def test_refused_reconnect_is_final(self) -> None:
        """
        A reconnect refused with 503 (busy) is tried again; one refused with
        403 ends the run with the handshake status.
        """
        run = _Run()
        run.welcome("e1", 0)
        run.drop()
        for status in (b"503 Service Unavailable", b"403 Forbidden"):
            run.clock.advance(8)
            run.last.protocol.dataReceived(b"HTTP/1.1 " + status + b"\r\n\r\n")
            run.last.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(run.connections), 3)
        self.assertIn("403", str(self._ends(run, EXIT_HANDSHAKE)))
        self.assertEqual(run.warnings, [])

    def test_the_first_connection_is_not_retried(self) -> None:
        """A first connection that fails ends the run: the URL is probably wrong."""
        run = _Run(refusals=[ConnectionRefusedError()])
        self._ends(run, EXIT_CANNOT_CONNECT)

    def test_interrupted_while_waiting(self) -> None:
        """An interrupt between attempts ends the run at once with status 130."""
        run = _Run()
        run.welcome("e1", 0)
        run.drop()
        run.session.interrupt()
        self._ends(run, EXIT_INTERRUPTED)
        self.assertEqual(len(run.connections), 1)


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


def _printed(process, predicate, what: str) -> Deferred:
    """
    Wait until the client running as ``process`` has printed a JSON event
    matching ``predicate``.

    :return: a Deferred firing with every event it has printed so far.
    """

    def found():
        if process.result is not None:
            raise FailTest("the client exited waiting for {}: {}".format(what, process.result))
        events = [json.loads(line) for line in process.lines()]
        return events if any(predicate(e) for e in events) else None

    return wait_for(found, timeout=30, what=what)


def _run_listener(testcase, port: int, *args: str):
    """
    Run the client with --json --reconnect (waits of at most 1 s) and
    ``args`` against loopback ``port``, its stdin left open so that it
    stays until the test closes it.
    """
    url = "ws://127.0.0.1:{}/".format(port)
    return run_module(
        testcase,
        "broadcaster.clients.cli",
        ["--json", "--reconnect", "--reconnect-max", "1", *args, url],
        stdin=None,
    )


@inlineCallbacks
def _finish(testcase, client):
    """
    Close ``client``'s stdin and check that it then closes cleanly, having
    printed nothing but JSON events.

    :return: a Deferred firing with its stderr lines.
    """
    client.transport.closeStdin()
    out, err, status = yield client.ended()
    testcase.assertEqual(status, 0, err)
    for line in out.splitlines():
        testcase.assertIsInstance(json.loads(line), dict)
    return err.splitlines()


class ReconnectScriptTests(TestCase):
    """
    ``--reconnect`` against real servers: restarted, or cutting the client off.
    """

    @inlineCallbacks
    def test_a_restarted_server(self) -> None:
        """
        A server killed and restarted on the same port gets the client back
        in its rooms: it prints what is said in them after the restart, and
        reports the recovery of each incomplete, as the epoch changed.
        """
        server, port = yield start_twistd(self)
        client = _run_listener(self, port, "--room", "dev")
        yield _printed(client, of_type("presence", room="dev"), "the client to join dev")
        server.transport.signalProcess("KILL")
        yield server.ended()
        yield start_twistd(self, port=port)
        yield _printed(client, of_type("recovered", room="dev"), "dev to be recovered")
        talker, _ = yield join_chat(self, port)
        talker.send_json({"type": "join", "room": "dev"})
        yield read_until(talker, of_type("presence", room="dev"))
        talker.send_json({"type": "message", "room": "dev", "text": "after the restart"})
        events = yield _printed(client, of_type("message", text="after the restart"), "it")
        self.assertEqual(len([e for e in events if e["type"] == "welcome"]), 2)
        self.assertEqual(
            sorted((e["room"], e["complete"]) for e in events if e["type"] == "recovered"),
            [("dev", False), ("lobby", False)],
        )
        stderr = yield _finish(self, client)
        self.assertEqual(len(stderr), 3, stderr)
        self.assertRegex(stderr[0], r"^broadcaster-client: reconnected after [0-9.]+ s \(attempt \d+\)$")
        self.assertEqual(
            sorted(stderr[1:]),
            [
                "broadcaster-client: recovery of room '{}' incomplete: some messages "
                "were lost".format(room)
                for room in ("dev", "lobby")
            ],
        )

    @inlineCallbacks
    def test_a_dropped_connection(self) -> None:
        """
        A connection the server drops at the TCP level is made again and
        both rooms recovered completely: what was said in the gap is
        printed exactly once, then what is said after.
        """
        service, port = yield start_server(self)
        talker, talker_welcome = yield join_chat(self, port)
        talker.send_json({"type": "join", "room": "dev"})
        yield read_until(talker, of_type("presence", room="dev"))
        client = _run_listener(self, port, "--room", "dev")
        events = yield _printed(client, of_type("presence", room="dev"), "the client to join dev")
        talker.send_json({"type": "message", "room": "dev", "text": "before"})
        yield _printed(client, of_type("message", text="before"), "before")

        # Cut it off and, in the same reactor turn, so before it can be
        # back, say something in each room: only a replay can bring it.
        service.hub.member(events[0]["id"]).transport.abortConnection()
        for room in ("dev", "lobby"):
            service.hub.publish_text(talker_welcome["id"], "gap in " + room, room)
        for room in ("lobby", "dev"):
            yield _printed(client, of_type("recovered", room=room), room + " to be recovered")
        talker.send_json({"type": "message", "room": "dev", "text": "after"})
        events = yield _printed(client, of_type("message", text="after"), "after")

        self.assertEqual(
            [(e["room"], e["text"]) for e in events if e["type"] == "message"],
            [("dev", "before"), ("lobby", "gap in lobby"), ("dev", "gap in dev"), ("dev", "after")],
        )
        self.assertEqual(
            [(e["room"], e["complete"]) for e in events if e["type"] == "recovered"],
            [("lobby", True), ("dev", True)],
        )
        stderr = yield _finish(self, client)
        self.assertEqual(len(stderr), 1, stderr)
        self.assertIn("reconnected after", stderr[0])

    @inlineCallbacks
    def test_expelled(self) -> None:
        """
        A client the server disconnects (4003) does not come back: it exits
        with status 4, the code and reason on stderr.
        """
        service, port = yield start_server(self)
        client = _run_listener(self, port)
        events = yield _printed(client, of_type("welcome"), "the welcome")
        service.hub.member(events[0]["id"]).expel("go away")
        out, err, status = yield client.ended()
        self.assertEqual(status, EXIT_CONNECTION)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("4003 go away", err)
        yield wait_for(lambda: len(service.hub) == 0, what="the client to be gone")

    @inlineCallbacks
    def test_name_and_token(self) -> None:
        """
        --name and --token or --token-file sign in to a server checking
        signed tokens; a refused token ends even a --reconnect run at once
        with status 3.
        """
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write(SECRET)
        os.chmod(secret, 0o600)
        service, port = yield start_server(self, ["--jwt-secret-file", secret])
        url = "ws://127.0.0.1:{}/".format(port)
        token = hs256(live_claims(sub="u-7"))
        token_file = self.mktemp()
        with open(token_file, "w") as f:
            f.write(token + "\n")
        for args in (["--token", token], ["--token-file", token_file]):
            out, err, status = yield run_client(
                self, ["--json", "--name", "ann", "--send", "hi", *args, url]
            )
            self.assertEqual((status, err), (0, ""))
            welcome = json.loads(out.splitlines()[0])
            self.assertEqual((welcome["user"], welcome["name"]), ("u-7", "ann"))

        forged = hs256(live_claims(), secret=SECRET[::-1])
        out, err, status = yield run_client(self, ["--json", "--reconnect", "--token", forged, url])
        self.assertEqual((out, status), ("", EXIT_HANDSHAKE))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("handshake refused: 403", err)
        self.assertEqual(service.hub.stats.refused_handshakes["auth"], 1)

    @inlineCallbacks
    def test_debug_log_keeps_the_token_secret(self) -> None:
        """--debug logs the handshake, the Authorization header's value redacted."""
        service, port = yield start_server(self)
        url = "ws://127.0.0.1:{}/".format(port)
        out, err, status = yield run_client(
            self, ["--debug", "--token", "s3cr3t-t0ken", "--send", "hi", url]
        )
        self.assertEqual(status, 0, err)
        self.assertIn("Authorization: <redacted>", err)
        self.assertNotIn("s3cr3t", err)

    @inlineCallbacks
    def test_rooms_in_plain_mode(self) -> None:
        """--room without --json is a usage error: exit 2, naming the flag."""
        out, err, status = yield run_client(self, ["--room", "dev", "ws://127.0.0.1:1/"])
        self.assertEqual((out, status), ("", EXIT_USAGE))
        self.assertIn("--room needs --json", err)


class OptionOrderTests(SynchronousTestCase):
    def test_options_may_follow_the_url(self):
        """'broadcaster-client URL --send Hello --count 3' works like options first."""
        options = Options()
        options.parseOptions(["ws://127.0.0.1:9999/", "--send", "Hello", "-n", "3", "--json"])
        self.assertEqual(
            (options["url"], options["send"], options["count"], options["json"]),
            ("ws://127.0.0.1:9999/", "Hello", 3, True),
        )
