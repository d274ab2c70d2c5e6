"""
Tests for :mod:`broadcaster.http.auth` and the handshake's use of it: real
WebSocket handshakes against a server whose ``--auth-url`` is a local
twisted.web service, and the answer parsing with ``StubTreq``.
"""

from __future__ import annotations

import json
from typing import List

import websocket as websocket_client
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from broadcaster.http.auth import AuthDenied, Authenticator, AuthUnavailable, Identity
from broadcaster.service.tap import Options
from tests.support import RawWebSocketClient, connect_client, start_server, wait_for
from tests.http.test_webhooks import serve

TOKEN = "Bearer tok-8c1f5e"
COOKIE = "sid=cookie-77aa31"
SECRETS = ("tok-8c1f5e", "cookie-77aa31")


class AuthService(Resource):
    """
    A stand-in for the operator's auth service: records each question and
    answers ``code`` with ``body``, or never answers if ``code`` is None.
    """

    isLeaf = True

    def __init__(self, code=200, body=b"") -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.asked: List[dict] = []
        self.held: List = []

    def render_POST(self, request):
        self.asked.append(json.loads(request.content.read()))
        if self.code is None:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


def handshake_status(port: int, origin=None) -> "Deferred":
    """
    Try a WebSocket handshake with credentials (websocket-client, in a thread).

    :return: a Deferred firing with 101 if it succeeded, else the HTTP status.
    """

    def attempt():
        try:
            ws = websocket_client.create_connection(
                "ws://127.0.0.1:{}/".format(port),
                header=["Authorization: " + TOKEN],
                cookie=COOKIE,
                origin=origin,
                timeout=10,
            )
        except websocket_client.WebSocketBadStatusException as e:
            return e.status_code
        ws.close()
        return 101

    return deferToThread(attempt)


class HandshakeTests(TestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def tearDown(self) -> None:
        for event in self.logged:
            text = repr(event) + (formatEvent(event) or "")
            for secret in SECRETS:
                self.assertNotIn(secret, text, "a credential was logged")

    @inlineCallbacks
    def start(self, service: AuthService, *args):
        auth = serve(self, service)
        server, port = yield start_server(self, ["--auth-url", auth.url + "/check", *args])
        return port

    @inlineCallbacks
    def test_accepted_identity_is_shown_and_kept(self):
        """A 2xx with user and name makes them the client's identity; hello cannot change it."""
        auth = AuthService(body=json.dumps({"user": "ann@example.com", "name": "Ann"}).encode())
        port = yield self.start(auth)
        client = yield connect_client(
            self,
            port,
            json_mode=True,
            path="/?name=bob",
            headers={"Authorization": TOKEN, "Cookie": COOKIE},
        )
        welcome = yield client.next_json()
        self.assertEqual((welcome["name"], welcome["user"]), ("Ann", "ann@example.com"))
        join = yield client.next_json()
        self.assertEqual((join["type"], join["name"]), ("join", "Ann"))
        (asked,) = auth.asked
        self.assertEqual(asked["path"], "/")
        self.assertEqual(asked["query"], {"name": ["bob"]})
        self.assertIsNone(asked["origin"])
        self.assertTrue(asked["peer"].startswith("tcp4:127.0.0.1:"))
        self.assertEqual(asked["headers"], {"authorization": TOKEN, "cookie": COOKIE})

        client.send_json({"type": "hello", "name": "Mallory", "ref": 1})
        error = yield client.next_json()
        self.assertEqual((error["type"], error["ref"]), ("error", 1))
        self.assertIn("cannot be changed", error["reason"])
        connects = [e for e in self.logged if "[CONNECT]" in e.get("log_format", "")]
        self.assertEqual([e.get("user") for e in connects], ["ann@example.com"])

    @inlineCallbacks
    def test_rooms_from_the_answer_are_kept(self):
        """The rooms the service answers bound what the client may do."""
        auth = AuthService(body=json.dumps({"user": "u1", "rooms": ["desk-*"]}).encode())
        port = yield self.start(auth)
        client = yield connect_client(
            self, port, json_mode=True, headers={"Authorization": TOKEN}
        )
        welcome = yield client.next_json()
        self.assertEqual(welcome["rights"], [])
        client.send_json({"type": "join", "room": "desk-7"})
        client.send_json({"type": "join", "room": "finance", "ref": 1})
        presence = yield client.next_json()
        self.assertEqual((presence["room"], presence["rights"]), ("desk-7", ["join", "publish", "history", "presence"]))
        while True:
            event = yield client.next_json()
            if event["type"] == "error":
                break
        self.assertEqual((event["ref"], event["reason"]), (1, "not allowed to join room 'finance'"))

    @inlineCallbacks
    def test_empty_2xx_admits_without_identity(self):
        """A 204 admits the client with its own ?name= and no user."""
        port = yield self.start(AuthService(code=204))
        client = yield connect_client(self, port, json_mode=True, path="/?name=bob")
        welcome = yield client.next_json()
        self.assertEqual(welcome["name"], "bob")
        self.assertNotIn("user", welcome)

    @inlineCallbacks
    def test_401_and_403_refuse_with_403(self):
        """The auth service's 401 or 403 refuses the handshake with 403."""
        for code in (401, 403):
            port = yield self.start(AuthService(code=code))
            self.assertEqual((yield handshake_status(port)), 403)
        refusals = [e for e in self.logged if "refused the credentials" in e.get("log_format", "")]
        self.assertEqual([e["status"] for e in refusals], [401, 403])
        self.assertEqual({e["log_level"] for e in refusals}, {LogLevel.warn})

    @inlineCallbacks
    def test_timeout_fails_closed_with_503(self):
        """An auth service that never answers gets the handshake a 503 after --auth-timeout."""
        auth = AuthService(code=None)
        port = yield self.start(auth, "--auth-timeout", "0.2")
        self.assertEqual((yield handshake_status(port)), 503)
        self.assertEqual(len(auth.asked), 1)
        errors = [e for e in self.logged if e["log_level"] == LogLevel.error]
        self.assertEqual([e["reason"] for e in errors], ["no answer within 0.2 s"])
        # The unanswered request was abandoned: its connection is closed.
        (request,) = auth.held
        yield wait_for(lambda: request._disconnected, what="the auth request's connection to close")

    @inlineCallbacks
    def test_client_leaving_during_the_question_abandons_it(self):
        """A client that hangs up while the service is asked cancels the question and never joins."""
        auth = AuthService(code=None)
        auth_server = serve(self, auth)
        service, port = yield start_server(self, ["--auth-url", auth_server.url + "/check"])
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(RawWebSocketClient)
        )
        client.opened.addErrback(lambda _: None)
        yield wait_for(lambda: auth.asked, what="the auth service to be asked")
        client.transport.abortConnection()
        yield client.closed
        (request,) = auth.held
        yield wait_for(lambda: request._disconnected, what="the question to be abandoned")
        yield wait_for(lambda: service.admission.connections == 0, what="the count")
        self.assertEqual(len(service.hub), 0)
        self.assertEqual([e for e in self.logged if "log_failure" in e], [])
        self.assertEqual([e for e in self.logged if e["log_level"] == LogLevel.error], [])

    @inlineCallbacks
    def test_5xx_fails_closed_with_503(self):
        """A 500 from the auth service refuses the handshake with 503 and logs an error."""
        port = yield self.start(AuthService(code=500))
        self.assertEqual((yield handshake_status(port)), 503)
        errors = [e for e in self.logged if e["log_level"] == LogLevel.error]
        self.assertEqual([e["reason"] for e in errors], ["the auth service answered HTTP 500"])

    @inlineCallbacks
    def test_malformed_answer_fails_closed_with_503(self):
        """A 200 whose body is not a JSON object refuses with 503."""
        port = yield self.start(AuthService(body=b"<html>ok</html>"))
        self.assertEqual((yield handshake_status(port)), 503)

    @inlineCallbacks
    def test_unreachable_service_fails_closed_with_503(self):
        """Nothing listening at --auth-url refuses with 503."""
        closed = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        url = "http://127.0.0.1:{}/check".format(closed.getHost().port)
        yield closed.stopListening()
        server, port = yield start_server(self, ["--auth-url", url])
        self.assertEqual((yield handshake_status(port)), 503)

    @inlineCallbacks
    def test_foreign_origin_never_reaches_the_service(self):
        """The Origin check comes first: a foreign page's handshake never reaches the service."""
        auth = AuthService()
        port = yield self.start(auth)
        self.assertEqual((yield handshake_status(port, origin="http://evil.example")), 403)
        self.assertEqual(auth.asked, [])


class AuthenticatorTests(SynchronousTestCase):
    """
    The answers, with ``StubTreq``.
    """

    def authenticate(self, resource, **kwargs):
        authenticator = Authenticator(
            "https://auth.example/check", StubTreq(resource), Clock(), **kwargs
        )
        return authenticator.authenticate(
            "tcp4:1.2.3.4:5", "/", {}, None, {"authorization": TOKEN, "user-agent": "x"}
        )

    def test_only_credential_headers_are_sent(self):
        """Of the handshake's headers only Authorization and Cookie are sent on."""
        auth = AuthService(code=204)
        self.assertEqual(self.successResultOf(self.authenticate(auth)), Identity())
        self.assertEqual(auth.asked[0]["headers"], {"authorization": TOKEN})

    def test_identity(self):
        """user and name come from the JSON answer, names checked like hello's."""
        auth = AuthService(body=b'{"user": "u1", "name": "  Ann  "}')
        self.assertEqual(
            self.successResultOf(self.authenticate(auth)), Identity(user="u1", name="Ann")
        )

    def test_bad_name_is_unavailable(self):
        """A name that hello would refuse makes the answer unusable (fail closed)."""
        auth = AuthService(body=json.dumps({"name": "x" * 40}).encode())
        failure = self.failureResultOf(self.authenticate(auth), AuthUnavailable)
        self.assertIn('"name"', str(failure.value))

    def test_rooms(self):
        """rooms comes from the answer as a token's claim would; one the
        server cannot read makes the answer unusable (fail closed)."""
        rooms = {"support-u1": ["join", "publish"]}
        auth = AuthService(body=json.dumps({"user": "u1", "rooms": rooms}).encode())
        identity = self.successResultOf(self.authenticate(auth))
        self.assertEqual((identity.user, identity.rooms), ("u1", rooms))
        auth = AuthService(body=json.dumps({"rooms": {"x": ["fly"]}}).encode())
        failure = self.failureResultOf(self.authenticate(auth), AuthUnavailable)
        self.assertIn('"rooms" is unusable: unknown right \'fly\'', str(failure.value))

    def test_denied(self):
        """401 is a denial, carrying the status."""
        failure = self.failureResultOf(self.authenticate(AuthService(code=401)), AuthDenied)
        self.assertEqual(failure.value.status, 401)

    def test_other_4xx_is_unavailable(self):
        """A 404 (a wrong --auth-url) fails closed rather than admitting or denying."""
        self.failureResultOf(self.authenticate(AuthService(code=404)), AuthUnavailable)


class OptionsTests(SynchronousTestCase):
    def parse(self, *args):
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_auth_url_must_be_http(self):
        """--auth-url must be an http(s) URL, and the error names the flag."""
        error = self.assertRaises(UsageError, self.parse, "--auth-url", "ftp://auth.example/")
        self.assertIn("--auth-url", str(error))
        self.assertEqual(
            self.parse("--auth-url", "https://auth.example/check")["auth-url"],
            "https://auth.example/check",
        )

    def test_auth_timeout_within_the_handshake_timeout(self):
        """--auth-timeout must be shorter than --open-handshake-timeout."""
        error = self.assertRaises(
            UsageError, self.parse, "--auth-url", "http://a.example/", "--auth-timeout", "10"
        )
        self.assertIn("--auth-timeout", str(error))
