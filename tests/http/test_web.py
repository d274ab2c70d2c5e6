"""
Tests for :mod:`broadcaster.http.site`: the page, its assets and ``/healthz`` over
real HTTP, on the same port as the WebSocket endpoint, and the host names it
answers to (DNS rebinding), with real clients.
"""

import json

import treq
import websocket as websocket_client
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support import connect_client, connect_plain_clients, start_server
from tests.test_admission import http_exchange


class SiteTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self)
        self.base = "http://127.0.0.1:{}".format(self.port)

    @inlineCallbacks
    def get(self, path, **kwargs):
        response = yield treq.get(self.base + path, persistent=False, **kwargs)
        body = yield response.content()
        return response, body

    @inlineCallbacks
    def test_root_serves_the_chat_page(self):
        """A plain GET / returns the HTML page with a strict content policy."""
        response, body = yield self.get("/")
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders("content-type")[0].startswith("text/html")
        )
        self.assertIn(b"<html", body.lower())
        (csp,) = response.headers.getRawHeaders("content-security-policy")
        self.assertIn("default-src 'self'", csp)
        self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])

    @inlineCallbacks
    def test_page_with_query_string(self):
        """The page is served for /?name=ann too."""
        response, body = yield self.get("/?name=ann")
        self.assertEqual(response.code, 200)
        self.assertIn(b"<html", body.lower())

    @inlineCallbacks
    def test_page_assets_are_served(self):
        """Every file the page references under /static/ is served with its type."""
        _, page = yield self.get("/")
        for name, kind in [("chat.js", "javascript"), ("chat.css", "text/css")]:
            self.assertIn("/static/{}".format(name).encode(), page)
            response, body = yield self.get("/static/" + name)
            self.assertEqual(response.code, 200, name)
            self.assertIn(kind, response.headers.getRawHeaders("content-type")[0])
            self.assertTrue(body)

    @inlineCallbacks
    def test_unknown_paths_are_404(self):
        """Paths the server does not have answer 404."""
        for path in ("/nope", "/static/nope.js"):
            response, _ = yield self.get(path)
            self.assertEqual(response.code, 404, path)

    @inlineCallbacks
    def test_healthz_reports_status_and_connections(self):
        """/healthz is JSON with the status and the live connection count."""
        response, body = yield self.get("/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        health = json.loads(body)
        self.assertEqual((health["status"], health["connections"]), ("ok", 0))
        yield connect_plain_clients(self, self.port, 2)
        _, body = yield self.get("/healthz")
        self.assertEqual(json.loads(body)["connections"], 2)


def handshake(port: int, host: str, origin: str) -> Deferred:
    """
    A WebSocket handshake on loopback ``port`` as a browser at ``origin``
    makes it when it reaches us as ``host``.

    :return: a Deferred firing with the HTTP status of the answer.
    """

    def connect():
        try:
            ws = websocket_client.create_connection(
                "ws://127.0.0.1:{}/".format(port), host=host, origin=origin, timeout=10
            )
        except websocket_client.WebSocketBadStatusException as e:
            return e.status_code
        ws.close()
        return 101

    return deferToThread(connect)


@inlineCallbacks
def get(port: int, path: str, host: str, method: str = "GET", **kwargs):
    """
    An HTTP request on loopback ``port`` for ``host``.

    :return: a Deferred firing with ``(status, body)``.
    """
    headers = dict(kwargs.pop("headers", {}), Host=host)
    response = yield treq.request(
        method, "http://127.0.0.1:{}{}".format(port, path), headers=headers,
        persistent=False, **kwargs
    )
    body = yield response.content()
    return response.code, body


class DNSRebindingTests(TestCase):
    """
    A page on evil.example whose name is rebound to 127.0.0.1 reaches a
    server on loopback as ``Host: evil.example`` with ``Origin:
    http://evil.example``, its own origin to the Origin check.
    """

    @inlineCallbacks
    def test_rebinding_page_is_refused_everything_on_loopback(self):
        """On a server listening on loopback, the rebinding page's WebSocket
        handshake and every request it makes (page, assets, /healthz,
        /metrics, /api) get 403 and a warning, while an honest client
        connected meanwhile keeps chatting."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, port = yield start_server(self, ["--api-key", "k3y"])
        honest = yield connect_client(self, port)
        yield honest.next_text()
        evil = "evil.example:{}".format(port)

        self.assertEqual((yield handshake(port, evil, "http://" + evil)), 403)
        for path in ("/", "/static/chat.js", "/healthz", "/metrics", "/nope"):
            self.assertEqual((yield get(port, path, evil)), (403, b"host not allowed\n"), path)
        status, _ = yield get(
            port, "/api/publish", evil, "POST", json={"text": "from evil"},
            headers={"Authorization": "Bearer k3y"},
        )
        self.assertEqual(status, 403)

        honest.send_text("still here")
        self.assertEqual((yield honest.next_text()), "still here")
        self.assertEqual(len(service.hub), 1)
        refused = [
            e for e in logged
            if e["log_level"] == LogLevel.warn and "[REFUSED]" in e.get("log_format", "")
        ]
        self.assertEqual([e["host"] for e in refused], [evil] * 7)
        self.assertEqual(refused[0]["log_format"], "[REFUSED] {peer}: Host {host!r} not allowed; answered 403")
        # Counted where an operator looks (a real Host asks /metrics).
        status, metrics = yield get(port, "/metrics", "127.0.0.1:{}".format(port))
        self.assertEqual(status, 200)
        self.assertIn(b'broadcaster_refused_requests_total{code="403"} 7.0', metrics)

    @inlineCallbacks
    def test_loopback_names_are_answered_on_loopback(self):
        """localhost, 127.0.0.1, [::1] and names under .localhost, with
        their own origin, chat and get the page."""
        _, port = yield start_server(self)
        for name in ("localhost", "127.0.0.1", "[::1]", "chat.localhost", "LocalHost."):
            host = "{}:{}".format(name, port)
            self.assertEqual((yield handshake(port, host, "http://" + host)), 101, host)
            status, body = yield get(port, "/", host)
            self.assertEqual(status, 200, host)
            self.assertIn(b"<html", body.lower())

    @inlineCallbacks
    def test_allow_host_answers_only_that_name(self):
        """With --allow-host chat.example, the page at chat.example chats
        and other names are refused; on loopback, the loopback names are
        still answered."""
        _, port = yield start_server(self, ["--allow-host", "chat.example"])
        for host in ("chat.example", "Chat.Example:{}".format(port), "localhost:{}".format(port)):
            self.assertEqual((yield handshake(port, host, "http://" + host)), 101, host)
            self.assertEqual((yield get(port, "/healthz", host))[0], 200, host)
        for host in ("evil.example", "app.chat.example", "chat.example.evil.example"):
            self.assertEqual((yield handshake(port, host, "http://" + host)), 403, host)
            self.assertEqual((yield get(port, "/", host))[0], 403, host)

    @inlineCallbacks
    def test_a_request_without_one_host_is_refused_in_http_1_1(self):
        """Under a host policy, an HTTP/1.1 request with no Host or two gets
        400; an HTTP/1.0 request with none (no browser sends it) is answered."""
        _, port = yield start_server(self)
        for head in (
            b"GET /healthz HTTP/1.1\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n",
        ):
            answer = yield deferToThread(http_exchange, port, head)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
        answer = yield deferToThread(http_exchange, port, b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:200])
