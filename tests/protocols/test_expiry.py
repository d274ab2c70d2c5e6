"""
Tests for :mod:`broadcaster.protocols.expiry`, and for what a WebSocket
connection signed in with a token does as its ``exp`` nears
(:mod:`broadcaster.protocols.websocket`): real tokens signed with PyJWT and
checked by a real :class:`~broadcaster.http.tokens.TokenAuthenticator`, over
in-memory transports, with time driven by a clock.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.flow import Limits
from broadcaster.core.identity import AuthUnavailable, Identity
from broadcaster.http.tokens import TokenAuthenticator, secret_key
from broadcaster.protocols.expiry import TokenExpiry
from broadcaster.protocols.origin import OriginPolicy
from broadcaster.protocols.websocket import TOKEN_EXPIRED, BroadcastServerFactory
from tests.http.test_tokens import NOW, SECRET, claims, hs256
from tests.support import OP_CLOSE, OP_TEXT, build_frame, handshake_request, immediate_hub, parse_frames


class RecordingConnection:
    """What a :class:`TokenExpiry` told, and when by its clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.told = []

    def token_expiring(self, expires: float, seconds: float) -> None:
        self.told.append(("expiring", self.clock.seconds(), expires, seconds))

    def token_expired(self) -> None:
        self.told.append(("expired", self.clock.seconds()))


class TokenExpiryTests(SynchronousTestCase):
    """The one timer of a token: a warning, then the end."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.connection = RecordingConnection(self.clock)

    def expiry(self, expires, warn=True) -> TokenExpiry:
        return TokenExpiry(self.clock, self.connection, expires, 60, 30, warn=warn)

    def test_warned_the_window_before_exp_and_ended_after_the_leeway(self):
        """The warning comes 60 s before exp with 60 s to go; the end 30 s after exp."""
        self.expiry(NOW + 600.0).start()
        self.clock.advance(539)
        self.assertEqual(self.connection.told, [])
        self.clock.advance(1)
        self.assertEqual(self.connection.told, [("expiring", NOW + 540, NOW + 600.0, 60)])
        self.clock.advance(89)
        self.assertEqual(len(self.connection.told), 1)
        self.clock.advance(1)
        self.assertEqual(self.connection.told[-1], ("expired", NOW + 630))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_warned_at_once_when_less_than_the_window_is_left(self):
        """A token with 20 s left is warned about as the connection opens."""
        self.expiry(NOW + 20.0).start()
        self.assertEqual(self.connection.told, [("expiring", NOW, NOW + 20.0, 20)])
        self.clock.advance(50)
        self.assertEqual(self.connection.told[-1], ("expired", NOW + 50))

    def test_without_warning_only_the_end(self):
        """A connection that cannot be warned (plain) is only ended, at exp plus the leeway."""
        self.expiry(NOW + 600.0, warn=False).start()
        self.clock.advance(630)
        self.assertEqual(self.connection.told, [("expired", NOW + 630)])

    def test_renewing_starts_over_from_the_new_exp(self):
        """After the warning, a newer token moves both the warning and the end."""
        expiry = self.expiry(NOW + 600.0)
        expiry.start()
        self.clock.advance(550)
        expiry.renew(NOW + 1200.0)
        self.assertEqual(expiry.expires, NOW + 1200.0)
        self.clock.advance(1200 - 60 - 550 - 1)
        self.assertEqual([told[0] for told in self.connection.told], ["expiring"])
        self.clock.advance(1)
        self.assertEqual(self.connection.told[-1], ("expiring", NOW + 1140, NOW + 1200.0, 60))
        self.clock.advance(90)
        self.assertEqual(self.connection.told[-1], ("expired", NOW + 1230))
        self.assertEqual(len(self.connection.told), 3)

    def test_a_token_without_exp_has_no_timer(self):
        """Renewed with a token without exp, the connection has no timer at all."""
        expiry = self.expiry(NOW + 600.0)
        expiry.start()
        expiry.renew(None)
        self.assertFalse(expiry.pending)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_leaves_no_timer(self):
        """Cancelled (the connection is lost), before or after the warning, nothing is left."""
        expiry = self.expiry(NOW + 600.0)
        expiry.start()
        expiry.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        expiry.start()
        self.clock.advance(540)
        expiry.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual([told[0] for told in self.connection.told], ["expiring"])


class TokenRefreshTests(SynchronousTestCase):
    """
    WebSocket clients signed in with HS256 tokens (exp 600 s ahead), on a
    server with a 60 s refresh window and a 30 s leeway.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.hub = immediate_hub(self.reactor, node_id="t")
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.tokens = []
        self.factory = self.make_factory()
        # Per transport: what came with the welcome, not yet read.
        self.unread = {}

    def make_factory(self, **kwargs) -> BroadcastServerFactory:
        verifier = TokenAuthenticator([secret_key(SECRET.encode())], self.reactor)
        kwargs.setdefault("authenticator", verifier)
        return BroadcastServerFactory(
            self.hub,
            OriginPolicy(),
            self.reactor,
            token_refresh_window=60,
            token_leeway=30,
            **kwargs,
        )

    def tearDown(self) -> None:
        for event in self.logged:
            text = repr(event) + (formatEvent(event) or "")
            for token in self.tokens:
                self.assertNotIn(token, text, "a token was logged")

    def token(self, **overrides) -> str:
        token = hs256(claims(**overrides))
        self.tokens.append(token)
        return token

    def connect(self, token=None, json_mode=True):
        """A client signed in with ``token``: its protocol and transport, the welcome read."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        headers = ["Authorization: Bearer " + token] if token is not None else []
        protocol.dataReceived(handshake_request(json_mode, headers))
        response, _, opened = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"101 Switching Protocols", response)
        transport.clear()
        transport.write(opened)
        self.addCleanup(self.lose, protocol)
        if json_mode:
            welcome, *rest = self.received(transport)
            self.assertEqual(welcome["type"], "welcome")
            # Its own join, if it may be in the lobby.
            self.unread[transport] = [e for e in rest if e["type"] != "join"]
        return protocol, transport

    def lose(self, protocol) -> None:
        if protocol.state != protocol.STATE_CLOSED:
            protocol.connectionLost(Failure(ConnectionDone()))

    def received(self, transport):
        """
        What the client was sent since last asked: JSON events, and
        ``("close", code, reason)``.
        """
        frames, rest = parse_frames(transport.value())
        self.assertEqual(rest, b"")
        transport.clear()
        return self.unread.pop(transport, []) + [
            json.loads(f.payload)
            if f.opcode == OP_TEXT
            else ("close", f.close_code, f.close_reason.decode())
            for f in frames
            if f.opcode in (OP_TEXT, OP_CLOSE)
        ]

    def send(self, protocol, request) -> None:
        protocol.dataReceived(build_frame(OP_TEXT, json.dumps(request).encode()))

    def test_expiring_comes_the_window_before_exp(self):
        """A JSON client hears nothing for 540 s, then {"type": "expiring"} with exp and 60 s to go."""
        _, transport = self.connect(self.token())
        self.reactor.advance(539)
        self.assertEqual(self.received(transport), [])
        self.reactor.advance(1)
        self.assertEqual(
            self.received(transport), [{"type": "expiring", "expires": NOW + 600.0, "in": 60}]
        )

    def test_expiring_at_once_when_the_token_is_nearly_spent(self):
        """A client whose token has 20 s left is warned right after its welcome and join."""
        _, transport = self.connect(self.token(exp=NOW + 20))
        self.assertEqual(
            self.received(transport), [{"type": "expiring", "expires": NOW + 20.0, "in": 20}]
        )

    def test_closed_with_4001_at_exp_plus_leeway(self):
        """A client that does not refresh is closed with 4001 "token expired" 30 s after exp."""
        protocol, transport = self.connect(self.token())
        self.reactor.advance(629)
        self.assertEqual([e["type"] for e in self.received(transport)], ["expiring"])
        self.assertEqual(protocol.state, protocol.STATE_OPEN)
        self.reactor.advance(1)
        self.assertEqual(self.received(transport), [("close", 4001, "token expired")])
        self.assertEqual(TOKEN_EXPIRED, 4001)
        (line,) = [e for e in self.logged if "[TOKEN EXPIRED]" in e.get("log_format", "")]
        self.assertEqual((line["user"], line["code"]), ("u-1842", 4001))

    def test_plain_client_is_closed_at_exp_unwarned(self):
        """A plain client, which cannot refresh, gets no warning and is closed with 4001."""
        _, transport = self.connect(self.token(), json_mode=False)
        transport.clear()
        self.reactor.advance(629)
        self.assertEqual(self.received(transport), [])
        self.reactor.advance(1)
        self.assertEqual(self.received(transport), [("close", 4001, "token expired")])

    def test_refresh_moves_the_expiry(self):
        """After a refresh with a token expiring at +1200 s, the client outlives the
        first exp, is warned at +1140 s and closed at +1230 s."""
        protocol, transport = self.connect(self.token(rooms=["lobby"]))
        self.reactor.advance(545)
        self.received(transport)
        self.send(protocol, {"type": "refresh", "token": self.token(exp=NOW + 1200), "ref": 7})
        self.assertEqual(
            self.received(transport),
            [
                {
                    "type": "refreshed",
                    "expires": NOW + 1200.0,
                    "rights": {"lobby": ["join", "publish", "history", "presence"]},
                    "left": [],
                    "ref": 7,
                }
            ],
        )
        self.reactor.advance(1140 - 545 - 1)
        self.assertEqual(self.received(transport), [])
        self.reactor.advance(1)
        self.assertEqual(
            self.received(transport), [{"type": "expiring", "expires": NOW + 1200.0, "in": 60}]
        )
        self.reactor.advance(90)
        self.assertEqual(self.received(transport), [("close", 4001, "token expired")])
        (line,) = [e for e in self.logged if "[TOKEN REFRESHED]" in e.get("log_format", "")]
        self.assertEqual(line["expires"], NOW + 1200.0)

    def assert_refused(self, protocol, transport, token, reason):
        """A refresh with ``token`` gets an error with the ref and ``reason``, and the
        old expiry stays: the client is still closed at +630 s."""
        self.send(protocol, {"type": "refresh", "token": token, "ref": "r1"})
        self.assertEqual(
            self.received(transport), [{"type": "error", "reason": reason, "ref": "r1"}]
        )
        warnings = [
            e
            for e in self.logged
            if "[REFRESH REFUSED]" in e.get("log_format", "") and e["log_level"] == LogLevel.warn
        ]
        self.assertEqual(warnings[-1]["expires"], NOW + 600.0)
        self.reactor.advance(NOW + 630 - self.reactor.seconds())
        self.assertEqual(self.received(transport)[-1], ("close", 4001, "token expired"))

    def test_refresh_for_another_user_is_refused(self):
        """A valid token whose sub is another user's is refused; the expiry stays."""
        protocol, transport = self.connect(self.token())
        self.assert_refused(
            protocol,
            transport,
            self.token(sub="u-9", exp=NOW + 3600),
            "refresh refused: the token is for another user",
        )

    def test_refresh_with_a_bad_token_is_refused(self):
        """A token with a bad signature is refused with why, never the token."""
        protocol, transport = self.connect(self.token())
        forged = hs256(claims(exp=NOW + 3600), secret=SECRET[::-1])
        self.tokens.append(forged)
        self.assert_refused(protocol, transport, forged, "refresh refused: bad signature")

    def test_refresh_with_an_expired_token_is_refused(self):
        """A token that has itself expired (past the leeway) is refused."""
        protocol, transport = self.connect(self.token())
        self.assert_refused(
            protocol,
            transport,
            self.token(exp=NOW - 31),
            "refresh refused: the token has expired",
        )

    def test_refresh_with_unusable_rooms_is_refused(self):
        """A token whose rooms the server cannot read is refused; the rights stay."""
        protocol, transport = self.connect(self.token(rooms=["lobby"]))
        self.assert_refused(
            protocol,
            transport,
            self.token(exp=NOW + 3600, rooms={"lobby": ["join", "admin"]}),
            "refresh refused: unusable rooms: unknown right 'admin':"
            " the rights are join, publish, history, presence",
        )
        self.assertTrue(protocol.grants.allows("lobby", "publish"))

    def test_refresh_replaces_the_rights(self):
        """The new token's rooms replace the old: rooms it may no longer join are
        left (the others told), and rooms it may now join can be joined."""
        protocol, transport = self.connect(self.token(rooms=["lobby", "dev", "ops"]))
        watcher, watcher_t = self.connect(self.token(sub="u-2"))
        for room in ("dev", "ops"):
            self.send(protocol, {"type": "join", "room": room})
            self.send(watcher, {"type": "join", "room": room})
        self.received(transport)
        self.received(watcher_t)
        narrower = self.token(exp=NOW + 1200, rooms={"lobby": "*", "dev": ["join"], "new": "*"})
        self.send(protocol, {"type": "refresh", "token": narrower})
        refreshed = self.received(transport)
        self.assertEqual(
            refreshed,
            [
                {
                    "type": "refreshed",
                    "expires": NOW + 1200.0,
                    "rights": {"lobby": ["join", "publish", "history", "presence"], "dev": ["join"]},
                    "left": ["ops"],
                }
            ],
        )
        self.assertEqual(self.hub.rooms_of(protocol.id), ["lobby", "dev"])
        (left,) = self.received(watcher_t)
        self.assertEqual((left["type"], left["room"], left["id"]), ("leave", "ops", protocol.id))
        self.send(protocol, {"type": "message", "room": "dev", "text": "hi", "ref": 1})
        self.assertEqual(
            self.received(transport),
            [{"type": "error", "reason": "not allowed to publish in room 'dev'", "ref": 1}],
        )
        self.send(protocol, {"type": "join", "room": "new"})
        self.assertIn("new", self.hub.rooms_of(protocol.id))

    def test_refresh_without_a_token_sign_in_is_refused(self):
        """A connection that did not sign in with a token cannot refresh."""
        self.factory = self.make_factory(authenticator=None)
        protocol, transport = self.connect()
        self.send(protocol, {"type": "refresh", "token": self.token(), "ref": 2})
        self.assertEqual(
            self.received(transport),
            [{"type": "error", "reason": "this connection did not sign in with a token", "ref": 2}],
        )

    def test_refresh_counts_against_the_rate(self):
        """A refresh is a request like any other under --rate."""
        self.factory = self.make_factory(limits=Limits(rate=1, burst=1))
        protocol, transport = self.connect(self.token())
        for ref in (1, 2):
            self.send(protocol, {"type": "refresh", "token": self.token(), "ref": ref})
        (answer, dropped) = self.received(transport)
        self.assertEqual((answer["type"], answer["ref"]), ("refreshed", 1))
        self.assertEqual(dropped["type"], "error")
        self.assertIn("rate limit exceeded", dropped["reason"])

    def test_a_token_checked_later_is_answered_then(self):
        """A refresh whose keys are awaited (a JWKS fetch) is answered when they
        come; if they cannot be had, the client is told to try again and the
        expiry stays."""
        verifier = PendingVerifier()
        self.factory = self.make_factory(authenticator=verifier)
        protocol, transport = self.connect(self.token())
        self.send(protocol, {"type": "refresh", "token": self.token(), "ref": 1})
        self.assertEqual(self.received(transport), [])
        verifier.checking[0].errback(AuthUnavailable("the JWKS could not be fetched"))
        self.assertEqual(
            self.received(transport),
            [
                {
                    "type": "error",
                    "reason": "refresh failed: tokens cannot be checked right now; try again",
                    "ref": 1,
                }
            ],
        )
        (logged,) = [e for e in self.logged if "[REFRESH REFUSED]" in e.get("log_format", "")]
        self.assertEqual(logged["log_level"], LogLevel.error)
        self.send(protocol, {"type": "refresh", "token": self.token(), "ref": 2})
        verifier.checking[1].callback(
            Identity(user="u-1842", expires=NOW + 900.0, from_token=True)
        )
        (refreshed,) = self.received(transport)
        self.assertEqual((refreshed["type"], refreshed["expires"]), ("refreshed", NOW + 900.0))
        self.reactor.advance(929)
        self.assertEqual([e["type"] for e in self.received(transport)], ["expiring"])
        self.reactor.advance(1)
        self.assertEqual(self.received(transport), [("close", 4001, "token expired")])

    def test_no_timer_is_left_when_the_connection_is_lost(self):
        """A connection lost while its token's timer runs and a refresh is being
        checked leaves neither behind."""
        verifier = PendingVerifier()
        # No keepalive, whose timer starts with the first connection.
        self.factory = self.make_factory(authenticator=verifier, limits=Limits(ping_interval=0))
        before = set(self.reactor.getDelayedCalls())
        protocol, transport = self.connect(self.token())
        ours = set(self.reactor.getDelayedCalls()) - before
        self.assertEqual(len(ours), 1)
        self.send(protocol, {"type": "refresh", "token": self.token()})
        self.send(protocol, {"type": "refresh", "token": self.token(), "ref": 3})
        self.assertEqual(
            self.received(transport),
            [
                {
                    "type": "error",
                    "reason": "a refresh is already under way: wait for its answer",
                    "ref": 3,
                }
            ],
        )
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(any(call.active() for call in ours))
        self.assertEqual(set(self.reactor.getDelayedCalls()) - before, set())
        (checking,) = verifier.checking
        self.assertTrue(verifier.cancelled)
        self.assertEqual(self.flushLoggedErrors(), [])


class PendingVerifier:
    """
    Signs in every handshake as u-1842 with a token expiring at +600 s, and
    checks a refresh's token for as long as it takes (for ever).
    """

    def __init__(self) -> None:
        self.checking = []
        self.cancelled = False

    def authenticate(self, peer, path, query, origin, headers) -> Deferred:
        return succeed(Identity(user="u-1842", expires=NOW + 600.0, from_token=True))

    def verify(self, token: str) -> Deferred:
        d = Deferred(lambda _: setattr(self, "cancelled", True))
        self.checking.append(d)
        return d
