"""
Tests for :mod:`broadcaster.http.upgrade`: the usual WebSocket handshake is
handed to Autobahn without twisted.web parsing it first, and anything
unusual still takes twisted.web's path, refusals included.
"""

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.http import site
from broadcaster.http.upgrade import MOST_HEADER_BYTES, MOST_HEADERS, plain_upgrade
from broadcaster.protocols.origin import HostPolicy
from tests.support import (
    RawWebSocketClient,
    build_frame,
    connect_raw,
    handshake_request,
    start_server,
)

LOOPBACK = HostPolicy(loopback=True)


def _with(*headers: str) -> bytes:
    return handshake_request(headers=headers)


class PlainUpgradeTests(SynchronousTestCase):
    """Which first bytes are taken as an ordinary handshake."""

    def test_the_usual_handshakes(self):
        """What browsers and client libraries send: with a query, a
        subprotocol, any case of header names, a port in Host."""
        for data in (
            handshake_request(),
            handshake_request(json_mode=True),
            _with("Origin: http://localhost:9999", "User-Agent: x"),
            handshake_request().replace(b"GET / ", b"GET /?name=ann&since=1:2 "),
            handshake_request().replace(b"Upgrade: websocket", b"UPGRADE:  WebSocket "),
        ):
            self.assertTrue(plain_upgrade(data, LOOPBACK), data)
        self.assertTrue(plain_upgrade(handshake_request(), HostPolicy()))

    def test_anything_else_takes_twisted_web_s_path(self):
        """Every request twisted.web might treat otherwise: partial,
        followed by more bytes, another method, version or path, a body,
        a header twice or malformed, no upgrade, too large, too many
        headers, Expect (twisted.web answers 100 Continue), a target with
        a control character or a byte beyond ASCII (twisted.web refuses
        them)."""
        usual = handshake_request()
        for data in (
            usual[:-2],
            usual[:-4],
            usual + build_frame(1, b"early"),
            usual.replace(b"GET ", b"POST "),
            usual.replace(b"HTTP/1.1", b"HTTP/1.0"),
            usual.replace(b"GET / ", b"GET /events "),
            usual.replace(b"GET / ", b"GET // "),
            usual.replace(b"GET / ", b"GET http://127.0.0.1:9999/ "),
            usual.replace(b"GET / ", b"GET  / "),
            _with("Content-Length: 0"),
            _with("Transfer-Encoding: chunked"),
            _with("Host: 127.0.0.1:9999"),
            _with("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="),
            _with("Bad Name: x"),
            _with(" folded: x"),
            _with("no colon"),
            _with("X-Control: a\x00b"),
            _with("X-Control: a\x1bb"),
            usual.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
            usual.replace(b"Upgrade: websocket\r\n", b""),
            _with("X-Padding: " + "a" * MOST_HEADER_BYTES),
            _with(*("X-{}: 1".format(n) for n in range(MOST_HEADERS))),
            _with("Expect: 100-continue"),
            usual.replace(b"GET / ", b"GET /?name=\xff "),
            usual.replace(b"GET / ", b"GET /?a\tb "),
            usual.replace(b"GET / ", b"GET /?a\x00b "),
            usual.replace(b"GET / ", b"GET /?a\x7fb "),
            b"\r\n\r\n",
            b"",
        ):
            self.assertFalse(plain_upgrade(data, LOOPBACK), data)

    def test_a_host_the_server_does_not_answer_to(self):
        """Its refusal is twisted.web's path's to make (with its 403 and
        log line); without Host, under a policy, likewise."""
        usual = handshake_request()
        self.assertFalse(
            plain_upgrade(usual.replace(b"127.0.0.1:9999", b"evil.example"), LOOPBACK)
        )
        self.assertFalse(plain_upgrade(usual.replace(b"Host: 127.0.0.1:9999\r\n", b""), LOOPBACK))
        self.assertTrue(plain_upgrade(usual.replace(b"127.0.0.1:9999", b"evil.example"), HostPolicy()))


class _Handshake(RawWebSocketClient):
    """A raw client whose handshake carries ``extra`` header lines."""

    def __init__(self, extra: bytes = b"") -> None:
        super().__init__()
        self.extra = extra

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + self.key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n" + self.extra + b"\r\n"
        )


class BothPathsTests(TestCase):
    """Over real TCP, a client is served alike on either path."""

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self)
        self.requests = []
        original = site.BoundedRequest.__init__

        def counted(request, *args, **kwargs):
            self.requests.append(request)
            original(request, *args, **kwargs)

        self.patch(site.BoundedRequest, "__init__", counted)

    @inlineCallbacks
    def _echoes(self, extra: bytes = b""):
        client = yield connect_raw(self, self.port, lambda: _Handshake(extra), abort=True)
        yield client.opened
        frame = yield client.next()
        self.assertIn(b"connected", frame.payload)
        client.send(build_frame(1, b"hello"))
        while True:
            frame = yield client.next()
            if frame.payload.endswith(b"hello"):
                break

    @inlineCallbacks
    def test_the_usual_handshake_skips_twisted_web(self):
        """Sent in one write, the handshake opens the connection, which
        then works, with no twisted.web request made for it."""
        yield self._echoes()
        self.assertEqual(self.requests, [])

    @inlineCallbacks
    def test_an_unusual_one_takes_twisted_web_s_path(self):
        """A header given twice (twisted.web joins them) goes through
        twisted.web, and the connection works the same."""
        yield self._echoes(b"X-Twice: 1\r\nX-Twice: 2\r\n")
        self.assertEqual(len(self.requests), 1)


class _TimerRecorder:
    """A reactor that notes the open-handshake timers it is asked for."""

    def __init__(self, reactor, timed):
        self._reactor = reactor
        self._timed = timed

    def callLater(self, delay, function, *args, **kwargs):
        if getattr(function, "__name__", "") == "onOpenHandshakeTimeout":
            self._timed.append(delay)
        return self._reactor.callLater(delay, function, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class OpenHandshakeTimerTests(TestCase):
    """
    A handed-over handshake is timed only while it waits (on its
    sign-in): one that finishes at once costs no timer.
    """

    @inlineCallbacks
    def _start(self, args=()):
        self.service, self.port = yield start_server(self, list(args))
        factory = self.service.websocket_factory
        self.timed = []
        self.patch(factory, "reactor", _TimerRecorder(factory.reactor, self.timed))

    @inlineCallbacks
    def test_a_handshake_finished_at_once_has_no_timer(self):
        yield self._start()
        for extra in (b"", b"X-Twice: 1\r\nX-Twice: 2\r\n"):
            client = yield connect_raw(self, self.port, lambda: _Handshake(extra), abort=True)
            yield client.opened
        self.assertEqual(self.timed, [])

    @inlineCallbacks
    def test_a_handshake_awaiting_its_sign_in_is_timed(self):
        from tests.http.test_auth import AuthService
        from tests.http.test_webhooks import serve

        auth = AuthService(code=None)
        url = serve(self, auth).url + "/check"
        yield self._start(
            ["--auth-url", url, "--auth-timeout", "0.5", "--open-handshake-timeout", "7"]
        )
        client = yield connect_raw(self, self.port, _Handshake, abort=True)
        with self.assertRaises(ConnectionError) as refused:
            yield client.opened
        self.assertIn("503", str(refused.exception))
        self.assertEqual(self.timed, [7.0])
