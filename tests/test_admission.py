"""
One admission policy for every listener, and HTTP requests bounded before
they are read: real clients on real sockets against a real server (a
``twistd`` process where its files and memory are looked at), each
hostile client next to an honest one that keeps receiving everything.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.protocols.admission import Admission
from broadcaster.protocols.images import error_frame
from tests.support import (
    FrameClient,
    assert_refused_503,
    LineClient,
    connect_client,
    connect_plain_clients,
    connect_raw,
    free_port,
    listening,
    port_of,
    start_server,
    start_twistd,
    wait_for,
)


class Silent(Protocol):
    """A TCP client that connects and says nothing."""

    def __init__(self):
        from twisted.internet.defer import Deferred

        self.closed = Deferred()

    def connectionLost(self, reason):
        self.closed.callback(None)


def http_exchange(port: int, request: bytes, then: bytes = b"", read_for: float = 5.0) -> bytes:
    """
    Send ``request`` on a plain socket, then ``then`` while the server lets
    us, and read the answer until the server closes (blocking: run it in a
    thread).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as s:
        s.sendall(request)
        if then:
            try:
                s.sendall(then)
            except OSError:
                pass  # the server stopped reading, as it should
        return read_answer(s, time.monotonic() + read_for)


def read_answer(sock, deadline: float, head_only: bool = False) -> bytes:
    """
    Read what the server sends on ``sock`` until it closes, ``deadline``
    passes, or (``head_only``) a response's head has ended (blocking).
    """
    answer = b""
    while time.monotonic() < deadline and not (head_only and b"\r\n\r\n" in answer):
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        answer += chunk
    return answer


def open_files(pid: int):
    """The regular files process ``pid`` has open (temporary files included)."""
    files = []
    for fd in os.listdir("/proc/{}/fd".format(pid)):
        try:
            target = os.readlink("/proc/{}/fd/{}".format(pid, fd))
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            files.append(target)
    return files


class AdmissionTests(SynchronousTestCase):
    """The counting itself."""

    def test_limits_and_release(self):
        """Connections are admitted up to each limit; a released ticket makes
        room once, however often it is released."""
        from twisted.internet.address import IPv4Address

        admission = Admission(max_connections=3, max_per_ip=2)
        a = IPv4Address("TCP", "10.0.0.1", 1)
        b = IPv4Address("TCP", "10.0.0.2", 1)
        first, second = admission.admit(a, "test"), admission.admit(a, "test")
        self.assertIn("too many connections from 10.0.0.1", admission.admit(a, "test"))
        third = admission.admit(b, "test")
        self.assertIn("the server is full", admission.admit(b, "test"))
        first.release()
        first.release()
        self.assertEqual(admission.connections, 2)
        self.assertNotIsInstance(admission.admit(a, "test"), str)
        for ticket in (second, third):
            ticket.release()
        self.assertEqual(admission.per_ip, {"10.0.0.1": 1})


class EveryListenerTests(TestCase):
    """--max-connections counts every port, and connections from accept."""

    @inlineCallbacks
    def test_raw_ports_count_and_are_refused_in_their_own_language(self):
        """
        With --max-connections 2, an honest WebSocket client and a line
        client fill the server: the next line client gets an ERROR line,
        an image client an error frame, a WebSocket client 503, and the
        honest client meanwhile gets every message.
        """
        service, port = yield start_server(self, ["--max-connections", "2"])
        ((honest, _),) = yield connect_plain_clients(self, port, 1)
        liner = yield connect_raw(self, port_of(service.line_endpoint), LineClient)
        yield liner.next()  # its own arrival
        yield honest.next_text()

        refused_line = yield connect_raw(self, port_of(service.line_endpoint), LineClient)
        self.assertEqual(
            (yield refused_line.next()), "ERROR the server is full (2 connections); closing"
        )
        yield refused_line.closed
        refused_image = yield connect_raw(self, port_of(service.image_endpoint), FrameClient)
        self.assertEqual(
            (yield refused_image.next()),
            error_frame("the server is full (2 connections); closing")[4:],
        )
        yield refused_image.closed
        yield assert_refused_503(self, port)

        liner.transport.write(b"still here\n")
        self.assertEqual((yield honest.next_text()), "still here")
        self.assertEqual(service.admission.connections, 2)

    @inlineCallbacks
    def test_connections_count_before_their_request(self):
        """
        A TCP connection that has not sent its HTTP request yet counts: with
        --max-connections 1 and one such connection open, a WebSocket
        client is refused 503; once it goes, the client gets in.
        """
        service, port = yield start_server(self, ["--max-connections", "1"])
        silent = yield connect_raw(self, port, Silent)
        yield wait_for(lambda: service.admission.connections == 1, what="the silent connection")
        yield assert_refused_503(self, port)
        silent.transport.loseConnection()
        yield wait_for(lambda: service.admission.connections == 0, what="it to go")
        client = yield connect_client(self, port)
        self.assertTrue(client.opened.called)

    @inlineCallbacks
    def test_per_ip_counts_every_port(self):
        """
        --max-connections-per-ip counts line-bridge and WebSocket connections
        together, per address: one from 127.0.0.1 fills its share, one from
        127.0.0.2 still gets in.
        """
        service, port = yield start_server(self, ["--max-connections-per-ip", "1"])
        liner = yield connect_raw(self, port_of(service.line_endpoint), LineClient)
        yield liner.next()
        yield assert_refused_503(self, port)
        factory = Factory.forProtocol(LineClient)
        other = yield TCP4ClientEndpoint(
            reactor, "127.0.0.1", port_of(service.line_endpoint), bindAddress=("127.0.0.2", 0)
        ).connect(factory)
        self.addCleanup(other.transport.loseConnection)
        self.assertTrue((yield other.next()).endswith(" connected"))


class RawPortsUnderAuthTests(TestCase):
    """With --auth-url, raw-TCP clients cannot sign in: their ports stay off."""

    @inlineCallbacks
    def test_raw_ports_are_off_with_auth_url(self):
        """--auth-url without --anonymous-raw-ports: nothing listens on the
        image port or the line bridge, and the log says why."""
        image, line = free_port(), free_port()
        process, port = yield start_twistd(
            self,
            [
                "--auth-url", "http://127.0.0.1:{}/check".format(free_port()),
                "--image-port", "tcp:{}:interface=127.0.0.1".format(image),
                "--line-port", "tcp:{}:interface=127.0.0.1".format(line),
            ],
        )
        self.assertFalse(listening(image))
        self.assertFalse(listening(line))
        self.assertIn("--image-port is off: with --auth-url", process.output())
        self.assertIn("--line-port is off: with --auth-url", process.output())

    @inlineCallbacks
    def test_anonymous_raw_ports_opens_them(self):
        """--anonymous-raw-ports opens them anyway, for anonymous clients."""
        service, _ = yield start_server(
            self, ["--auth-url", "http://127.0.0.1:1/check", "--anonymous-raw-ports"]
        )
        liner = yield connect_raw(self, port_of(service.line_endpoint), LineClient)
        self.assertTrue((yield liner.next()).endswith(" connected"))


class RawIdleTests(TestCase):
    @inlineCallbacks
    def test_a_silent_raw_client_is_told_and_dropped(self):
        """A line client that sends nothing for --raw-idle-timeout is told
        so and disconnected; one that keeps talking stays."""
        service, _ = yield start_server(self, ["--raw-idle-timeout", "1"])
        line_port = port_of(service.line_endpoint)
        # Before the connection: the server's idle timer starts after it.
        started = reactor.seconds()
        quiet = yield connect_raw(self, line_port, LineClient)
        talker = yield connect_raw(self, line_port, LineClient)
        ticking = LoopingCall(talker.transport.write, b"tick\n")
        ticking.start(0.3)
        self.addCleanup(lambda: ticking.running and ticking.stop())
        lines = []
        while True:
            line = yield quiet.next()
            lines.append(line)
            if line.startswith("ERROR"):
                break
        self.assertEqual(lines[-1], "ERROR idle for 1 s (--raw-idle-timeout); closing")
        yield quiet.closed
        self.assertLess(reactor.seconds() - started, 5)
        self.assertGreater(reactor.seconds() - started, 1)
        self.assertFalse(talker.closed.called)


class HTTPBoundsTests(TestCase):
    """HTTP requests are bounded before they are read."""

    @inlineCallbacks
    def test_huge_bodies_are_refused_from_their_headers(self):
        """
        A 64 MiB POST to /healthz and to /api/publish is answered 413 from
        its Content-Length, before the body is sent, and nothing is written
        to disk; a small publish still works.
        """
        process, port = yield start_twistd(self, ["--api-key", "k3y"])
        pid = process.transport.pid
        before = open_files(pid)
        for path in (b"/healthz", b"/api/publish"):
            head = (
                b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k3y\r\n"
                b"Content-Type: application/json\r\nContent-Length: 67108864\r\n\r\n"
            )
            answer = yield deferToThread(http_exchange, port, head)
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:200])
            self.assertIn(b"larger than the", answer)
        self.assertEqual(open_files(pid), before)
        body = b'{"text": "hello"}'
        answer = yield deferToThread(
            http_exchange,
            port,
            b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k3y\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body,
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 202 "), answer[:200])

    @inlineCallbacks
    def test_a_chunked_body_is_cut_as_it_passes_the_limit(self):
        """A chunked body to /healthz is answered 413 once it passes 1 KiB."""
        _, port = yield start_server(self)
        chunk = b"%x\r\n%s\r\n" % (512, b"x" * 512)
        answer = yield deferToThread(
            http_exchange,
            port,
            b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunk * 64,
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:200])

    @inlineCallbacks
    def test_other_methods_get_405_without_their_body_read(self):
        """PUT and DELETE get 405 at once, whatever body they announce."""
        _, port = yield start_server(self)
        for method in (b"PUT", b"DELETE", b"OPTIONS"):
            answer = yield deferToThread(
                http_exchange,
                port,
                method + b" / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000\r\n\r\n",
            )
            self.assertTrue(answer.startswith(b"HTTP/1.1 405 "), answer[:200])

    @inlineCallbacks
    def test_a_trickled_request_has_one_deadline(self):
        """
        A client trickling its headers a byte at a time is answered 408
        once --open-handshake-timeout has passed since it connected, though
        every byte came well within it; an honest client meanwhile chats.
        """
        service, port = yield start_server(self, ["--open-handshake-timeout", "1"])
        (a, _), (b, _) = yield connect_plain_clients(self, port, 2)

        def trickle():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                started = time.monotonic()
                request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 100
                answer = b""
                for byte in request:
                    try:
                        s.sendall(bytes([byte]))
                    except OSError:
                        break
                    s.settimeout(0.1)
                    try:
                        answer += s.recv(4096)
                    except socket.timeout:
                        continue
                    if answer:
                        break
                return answer, time.monotonic() - started

        trickled = deferToThread(trickle)
        a.send_text("meanwhile")
        self.assertEqual((yield b.next_text()), "meanwhile")
        answer, elapsed = yield trickled
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:200])
        self.assertLess(elapsed, 3)

    @inlineCallbacks
    def test_http_1_0_upgrade_is_refused(self):
        """A WebSocket handshake in HTTP/1.0 is answered 400, never 101."""
        _, port = yield start_server(self)
        answer = yield deferToThread(
            http_exchange,
            port,
            b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.0 400 ") or answer.startswith(b"HTTP/1.1 400 "), answer[:200])
        self.assertIn(b"HTTP/1.1", answer.split(b"\r\n\r\n", 1)[1])
