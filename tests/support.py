"""
Helpers shared by the integration tests: a real server on a free loopback
port, and ways to wait for things without sleeping.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Callable, Iterable, List, Optional, Tuple

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks, returnValue
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater

from twisted.trial.unittest import FailTest

from broadcaster.service.workers import TWISTD
from broadcaster.core.hub import Hub
from broadcaster.service.tap import BroadcasterService, Options, makeService


def clocked_hub(clock, **kwargs) -> Hub:
    """
    A hub whose fan-out also times its rounds on ``clock`` (a fake one):
    rounds then take no time, so presence is never paced and a turn of the
    clock delivers everything, however slowly the machine runs the test.
    """
    hub = Hub(clock, **kwargs)
    hub.fanout.timer = clock.seconds
    return hub


def immediate_hub(clock, **kwargs) -> Hub:
    """
    A hub whose fan-out delivers at once rather than at the end of the
    reactor turn: the same engine, for tests of protocols and observers over
    in-memory transports, where the turn is not what is tested.
    """
    hub = Hub(clock, **kwargs)
    hub.fanout.immediate = True
    return hub


def server_options(args: Iterable[str] = ()) -> Options:
    """
    Parse ``twistd broadcaster`` arguments, every port on a free loopback
    port unless ``args`` says otherwise.
    """
    loopback = "tcp:0:interface=127.0.0.1"
    options = Options()
    options.parseOptions(
        ["--port", loopback, "--image-port", loopback, "--line-port", loopback, *args]
    )
    return options


@inlineCallbacks
def start_server(testcase, args: Iterable[str] = ()):
    """
    Start the whole service as ``twistd broadcaster`` would, on a free port,
    and stop it when ``testcase`` ends.

    :return: a Deferred firing with ``(service, port_number)``.
    """
    service: BroadcasterService = makeService(server_options(args), reactor=reactor)
    service.privilegedStartService()
    service.startService()
    testcase.addCleanup(service.stopService)
    port = yield service.web_endpoint.when_listening()
    returnValue((service, port.getHost().port))


@inlineCallbacks
def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """
    Poll ``predicate`` on the reactor until it is true, failing after ``timeout``.

    For state that no Deferred announces (e.g. the server noticing a client
    vanished).  Polls every 10 ms; never blocks the reactor.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            returnValue(value)
        if time.monotonic() > deadline:
            raise FailTest("timed out after {}s waiting for {}".format(timeout, what))
        yield deferLater(reactor, 0.01, lambda: None)


class Inbox:
    """
    What a test client has received, and a way to wait for the next item
    without sleeping: ``yield inbox.next()``.
    """

    def __init__(self) -> None:
        self.items: list = []
        self._read = 0
        self._waiting: Optional[Deferred] = None
        self.closed = False

    def put(self, item) -> None:
        self.items.append(item)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    @inlineCallbacks
    def next(self, timeout: float = 10.0):
        """
        Wait for the next item not yet returned.

        :raise FailTest: if the connection closes or ``timeout``
            passes first.
        """
        deadline = reactor.seconds() + timeout
        while self._read >= len(self.items):
            if self.closed:
                raise FailTest("connection closed while waiting for a message")
            remaining = deadline - reactor.seconds()
            if remaining <= 0:
                raise FailTest("no message within {}s".format(timeout))
            self._waiting = Deferred()
            self._waiting.addTimeout(remaining, reactor)
            try:
                yield self._waiting
            except TimeoutError:
                raise FailTest("no message within {}s".format(timeout)) from None
        item = self.items[self._read]
        self._read += 1
        return item


class RecordingClientProtocol(WebSocketClientProtocol):
    """
    An Autobahn client that records what it receives and lets a test wait
    for it: ``yield client.next()`` returns the next ``(payload, is_binary)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inbox = Inbox()
        self.received = self.inbox.items
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.subprotocol: Optional[str] = None

    def onConnect(self, response) -> None:
        self.subprotocol = response.protocol

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.inbox.put((payload, isBinary))

    def onClose(self, wasClean: bool, code, reason) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError("handshake failed: {} {}".format(code, reason)))
        self.closed.callback((wasClean, code, reason))
        self.inbox.close()

    def next(self, timeout: float = 10.0) -> Deferred:
        """
        Wait for the next message not yet returned.

        :return: a Deferred firing with ``(payload, is_binary)``.
        """
        return self.inbox.next(timeout)

    @inlineCallbacks
    def next_text(self, timeout: float = 10.0):
        """Wait for the next message, which must be text, and decode it."""
        payload, binary = yield self.next(timeout)
        if binary:
            raise FailTest("expected text, got {} binary bytes".format(len(payload)))
        return payload.decode("utf-8")

    @inlineCallbacks
    def next_json(self, timeout: float = 10.0):
        """Wait for the next message, which must be a JSON event."""
        text = yield self.next_text(timeout)
        return json.loads(text)

    def send_text(self, text: str) -> None:
        self.sendMessage(text.encode("utf-8"))

    def send_json(self, obj) -> None:
        self.sendMessage(json.dumps(obj).encode("utf-8"))


@inlineCallbacks
def connect_client(
    testcase,
    port: int,
    json_mode: bool = False,
    path: str = "/",
    headers=None,
    useragent: Optional[str] = None,
):
    """
    Connect a :class:`RecordingClientProtocol` to a server on loopback, wait
    for its handshake, and close it when ``testcase`` ends.

    :return: a Deferred firing with the open client protocol.
    """
    url = "ws://127.0.0.1:{}{}".format(port, path)
    factory = WebSocketClientFactory(
        url,
        protocols=["broadcaster.json"] if json_mode else None,
        headers=headers,
        useragent=useragent,
    )
    factory.protocol = RecordingClientProtocol
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = yield endpoint.connect(factory)
    testcase.addCleanup(close_client, client)
    yield client.opened
    return client


@inlineCallbacks
def connect_plain_clients(testcase, port: int, count: int):
    """
    Connect ``count`` plain clients one after the other and read every
    announcement their arrival causes, so that each client's next message is
    whatever the test sends next.

    :return: a Deferred firing with a list of ``(client, id)``.
    """
    clients: List[Tuple[RecordingClientProtocol, str]] = []
    for _ in range(count):
        client = yield connect_client(testcase, port)
        announcement = yield client.next_text()
        member_id = announcement.split()[0]
        for earlier, _ in clients:
            heard = yield earlier.next_text()
            if heard != announcement:
                raise FailTest("expected {!r}, got {!r}".format(announcement, heard))
        clients.append((client, member_id))
    return clients


@inlineCallbacks
def assert_refused_503(testcase, port: int):
    """
    Try a WebSocket handshake on ``port`` and fail ``testcase`` unless it is
    refused with HTTP 503.
    """
    factory = WebSocketClientFactory("ws://127.0.0.1:{}/".format(port))
    factory.protocol = RecordingClientProtocol
    client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    yield testcase.assertFailure(client.opened, ConnectionError)
    testcase.assertIn("503", client.wasNotCleanReason or "")


def close_client(client: RecordingClientProtocol) -> Deferred:
    """Close ``client`` if it is still open; fires once it is closed."""
    if not client.closed.called:
        client.sendClose()
        client.closed.addTimeout(10, reactor)
    return client.closed


def self_signed_certificate(directory: str) -> Tuple[str, str]:
    """
    Write a fresh self-signed certificate for 127.0.0.1/localhost and its key.

    :return: ``(key_path, cert_path)``.
    """
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class FrameClient(Protocol):
    """
    A raw-TCP client of the image port: ``yield client.next()`` returns the
    payload of the next length-prefixed frame.
    """

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.closed: Deferred = Deferred()
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = struct.unpack(">I", self._buffer[:4])
            if len(self._buffer) < 4 + length:
                return
            self.inbox.put(self._buffer[4 : 4 + length])
            self._buffer = self._buffer[4 + length :]

    def connectionLost(self, reason) -> None:
        self.inbox.close()
        self.closed.callback(None)

    def next(self, timeout: float = 10.0) -> Deferred:
        return self.inbox.next(timeout)

    def send_frame(self, payload: bytes) -> None:
        self.transport.write(struct.pack(">I", len(payload)) + payload)


class LineClient(Protocol):
    """
    A raw-TCP client of the line bridge: ``yield client.next()`` returns the
    next line, decoded, without its line end.
    """

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.closed: Deferred = Deferred()
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.inbox.put(line.decode("utf-8"))

    def connectionLost(self, reason) -> None:
        self.inbox.close()
        self.closed.callback(None)

    def next(self, timeout: float = 10.0) -> Deferred:
        return self.inbox.next(timeout)


def port_of(endpoint) -> int:
    """The TCP port a started service's :class:`ReportingEndpoint` listens on."""
    return endpoint.port.getHost().port


@inlineCallbacks
def connect_raw(testcase, port: int, protocol_class, abort: bool = False):
    """
    Connect a raw-TCP test client (a protocol with a ``closed`` Deferred)
    to loopback ``port``, and disconnect it, if the server has not, when
    ``testcase`` ends: cleanly, or with ``abort`` at once, queued bytes and
    all.
    """
    factory = Factory.forProtocol(protocol_class)
    client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)

    def disconnect():
        if not client.closed.called:
            if abort:
                client.transport.abortConnection()
            else:
                client.transport.loseConnection()
        return client.closed

    testcase.addCleanup(disconnect)
    return client


#: The checkout's root, put first on a child process's PYTHONPATH so it
#: runs this code rather than an installed copy.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_env() -> dict:
    """
    The environment for a child process that must run this checkout (its
    root first on PYTHONPATH) rather than an installed copy.
    """
    path = [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def free_port() -> int:
    """A loopback port nothing listens on now (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@inlineCallbacks
def start_twistd(testcase, args: Iterable[str] = (), port: Optional[int] = None):
    """
    Run ``twistd -n broadcaster`` on this checkout in a process of its own,
    on a free loopback port (no raw-TCP ports unless ``args`` add them),
    killed and reaped when ``testcase`` ends; wait until it listens.

    :param port: the port to listen on instead, e.g. that of a server the
        test killed, to restart it where its clients will look for it.
    :return: a Deferred firing with ``(process, port)``.
    """
    if port is None:
        port = free_port()
    argv = [
        sys.executable, "-c", TWISTD, "-n", "--pidfile=", "broadcaster",
        "--port", "tcp:{}:interface=127.0.0.1".format(port),
        "--image-port", "none", "--line-port", "none", *args,
    ]
    process = CollectingProcess()
    reactor.spawnProcess(process, sys.executable, argv, env=checkout_env())

    def reap():
        if process.result is None:
            process.transport.signalProcess("KILL")
        return process.ended()

    testcase.addCleanup(reap)
    yield wait_for(
        lambda: listening(port) or process.result is not None, timeout=30, what="twistd"
    )
    if process.result is not None:
        raise FailTest("twistd exited at start-up: {}".format(process.result))
    return process, port


class CollectingProcess(ProcessProtocol):
    """
    A child process that is fed ``stdin`` (then EOF) and whose output and
    exit status are collected: ``yield process.ended()``.
    """

    def __init__(self, stdin: Optional[bytes] = None) -> None:
        self._stdin = stdin
        self._out: List[bytes] = []
        self._err: List[bytes] = []
        self.result: Optional[Tuple[str, str, Optional[int]]] = None
        self._waiting: List[Deferred] = []

    def connectionMade(self) -> None:
        if self._stdin is not None:
            self.transport.write(self._stdin)
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        self._err.append(data)

    def processEnded(self, reason) -> None:
        self.result = (
            b"".join(self._out).decode("utf-8"),
            b"".join(self._err).decode("utf-8"),
            reason.value.exitCode,
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.result)

    def output(self) -> str:
        """
        What the process has written so far, standard output then error.
        """
        return b"".join(self._out + self._err).decode("utf-8", "replace")

    def lines(self, stderr: bool = False) -> List[str]:
        """
        The whole lines the process has written so far on standard output
        (or error), without a last one it is still writing.
        """
        written = b"".join(self._err if stderr else self._out)
        return written.decode("utf-8", "replace").split("\n")[:-1]

    def ended(self) -> Deferred:
        """
        :return: a Deferred firing with ``(stdout, stderr, exit_status)``.
        """
        d: Deferred = Deferred()
        if self.result is not None:
            d.callback(self.result)
        else:
            self._waiting.append(d)
        return d


def run_module(testcase, module: str, args: Iterable[str], stdin: Optional[bytes] = None):
    """
    Run ``python -m MODULE ARGS`` on this checkout, killing and reaping it if
    it is still running when ``testcase`` ends.

    :return: the :class:`CollectingProcess`.
    """
    env = checkout_env()
    process = CollectingProcess(stdin)
    argv = [sys.executable, "-m", module, *args]
    reactor.spawnProcess(process, sys.executable, argv, env=env)

    def reap() -> Deferred:
        if process.result is None:
            process.transport.signalProcess("KILL")
        return process.ended()

    testcase.addCleanup(reap)
    return process


# RFC 6455 frames built and read by hand, for conformance and fuzz tests that
# must send what no well-behaved client library would.

#: Frame opcodes (RFC 6455 section 5.2).
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

#: RSV1, RSV2 and RSV3 as the number ``build_frame`` takes.
RSV1, RSV2, RSV3 = 4, 2, 1

#: The masking key used unless a test chooses another.
DEFAULT_MASK = b"\x37\xfa\x21\x3d"


def handshake_request(json_mode: bool = False, headers: Iterable[str] = ()) -> bytes:
    """
    The bytes of a client's WebSocket handshake for ``/``, to feed a
    protocol over an in-memory transport: asking for the JSON subprotocol
    if ``json_mode``, with each of ``headers`` (``"Name: value"``) added.
    """
    lines = [
        "GET / HTTP/1.1",
        "Host: 127.0.0.1:9999",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if json_mode:
        lines.append("Sec-WebSocket-Protocol: broadcaster.json")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def build_frame(
    opcode: int,
    payload: bytes = b"",
    fin: bool = True,
    rsv: int = 0,
    mask: Optional[bytes] = DEFAULT_MASK,
    length: Optional[int] = None,
    length_bits: Optional[int] = None,
) -> bytes:
    """
    One WebSocket frame laid out as RFC 6455 section 5.2 says, right or wrong.

    :param rsv: the three reserved bits as a number from 0 to 7 (``RSV1`` is 4).
    :param mask: the 4-byte masking key, or ``None`` for an unmasked frame.
    :param length: the payload length to declare, if not ``len(payload)``
        (for a header whose body follows later, or never).
    :param length_bits: 7, 16 or 64: the length encoding to use; by default
        the shortest that holds the length, as the RFC requires.
    """
    declared = len(payload) if length is None else length
    if length_bits is None:
        length_bits = 7 if declared < 126 else 16 if declared < 2**16 else 64
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    mask_bit = 0x80 if mask is not None else 0
    if length_bits == 7:
        header = struct.pack(">BB", first, mask_bit | declared)
    elif length_bits == 16:
        header = struct.pack(">BBH", first, mask_bit | 126, declared)
    elif length_bits == 64:
        header = struct.pack(">BBQ", first, mask_bit | 127, declared)
    else:
        raise ValueError("length_bits must be 7, 16 or 64")
    if mask is None:
        return header + payload
    return header + mask + _xor_mask(payload, mask)


def _xor_mask(payload: bytes, mask: bytes) -> bytes:
    # Masking and unmasking are the same XOR (RFC 6455 section 5.3).
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: Optional[int] = None, reason: bytes = b"") -> bytes:
    """
    The body of a close frame: a 2-byte status code, then a UTF-8 reason.
    """
    if code is None:
        return reason
    return struct.pack(">H", code) + reason


class Frame:
    """
    One frame read off the wire, its payload already unmasked.

    :ivar masked: whether the sender masked it (servers must not).
    """

    def __init__(self, fin: bool, rsv: int, opcode: int, masked: bool, payload: bytes) -> None:
        self.fin = fin
        self.rsv = rsv
        self.opcode = opcode
        self.masked = masked
        self.payload = payload

    @property
    def close_code(self) -> Optional[int]:
        """The status code of a close frame, or ``None`` if it has none."""
        if len(self.payload) < 2:
            return None
        return struct.unpack(">H", self.payload[:2])[0]

    @property
    def close_reason(self) -> bytes:
        """The raw reason of a close frame."""
        return self.payload[2:]

    def __repr__(self) -> str:
        return "Frame(fin={}, rsv={}, opcode={:#x}, masked={}, payload={!r})".format(
            self.fin, self.rsv, self.opcode, self.masked, self.payload[:60]
        )


def parse_frame(data: bytes) -> Optional[Tuple[Frame, bytes]]:
    """
    Read the first frame of ``data``.

    :return: ``(frame, rest of data)``, or ``None`` if ``data`` does not yet
        hold a whole frame.
    """
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    masked = bool(second & 0x80)
    length = second & 0x7F
    offset = 2
    if length == 126:
        if len(data) < 4:
            return None
        (length,) = struct.unpack(">H", data[2:4])
        offset = 4
    elif length == 127:
        if len(data) < 10:
            return None
        (length,) = struct.unpack(">Q", data[2:10])
        offset = 10
    mask = None
    if masked:
        if len(data) < offset + 4:
            return None
        mask = data[offset : offset + 4]
        offset += 4
    if len(data) < offset + length:
        return None
    payload = data[offset : offset + length]
    if mask is not None:
        payload = _xor_mask(payload, mask)
    frame = Frame(bool(first & 0x80), (first >> 4) & 0x7, first & 0xF, masked, payload)
    return frame, data[offset + length :]


def parse_frames(data: bytes) -> Tuple[List[Frame], bytes]:
    """
    Read every whole frame in ``data``.

    :return: ``(frames, bytes left over that are not yet a whole frame)``.
    """
    frames = []
    while True:
        parsed = parse_frame(data)
        if parsed is None:
            return frames, data
        frame, data = parsed
        frames.append(frame)


class RawWebSocketClient(Protocol):
    """
    A WebSocket client that does the opening handshake by hand and then
    sends whatever bytes a test gives it: ``client.send(build_frame(...))``.
    ``yield client.next()`` returns the next :class:`Frame` from the server;
    ``client.closed`` fires once the TCP connection is gone, and
    ``client.reason`` then says how it ended.
    """

    _GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, path: str = "/") -> None:
        import base64

        self.path = path
        self.key = base64.b64encode(os.urandom(16))
        self.inbox = Inbox()
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        #: Why the TCP connection ended, once it has.
        self.reason = None
        self._buffer = b""
        self._open = False

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET " + self.path.encode("ascii") + b" HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + self.key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._open:
            head, blank, rest = self._buffer.partition(b"\r\n\r\n")
            if not blank:
                return
            self._buffer = rest
            self._handshake_answered(head)
            if not self._open:
                return
        frames, self._buffer = parse_frames(self._buffer)
        for frame in frames:
            self.inbox.put(frame)

    def _handshake_answered(self, head: bytes) -> None:
        import base64
        import hashlib

        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self.key + self._GUID).digest()).decode()
        if status.split()[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            self.opened.errback(ConnectionError("handshake refused: {}".format(status)))
            self.transport.loseConnection()
            return
        self._open = True
        self.opened.callback(self)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.inbox.close()
        if not self.opened.called:
            self.opened.errback(ConnectionError("connection lost during the handshake"))
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def next(self, timeout: float = 10.0) -> Deferred:
        """
        Wait for the next frame from the server.

        :return: a Deferred firing with a :class:`Frame`.
        """
        return self.inbox.next(timeout)


@inlineCallbacks
def connect_raw_websocket(testcase, port: int, path: str = "/"):
    """
    Connect a :class:`RawWebSocketClient` to loopback ``port``, wait for its
    handshake, and drop it (if the server has not) when ``testcase`` ends.

    :return: a Deferred firing with the open client.
    """
    client = yield connect_raw(testcase, port, lambda: RawWebSocketClient(path), abort=True)
    yield client.opened
    return client
