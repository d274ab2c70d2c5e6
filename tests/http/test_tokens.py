"""
Tests for :mod:`broadcaster.http.tokens`: real tokens signed here with PyJWT
(HS256, RS256 and ES256 keys made by ``cryptography``) checked against a
``task.Clock``; a JWKS served by a real local twisted.web server, its keys
rotated; and real WebSocket handshakes against a server started with the
``--jwt-*`` flags, alone and beside ``--auth-url``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from typing import List

import jwt
import websocket as websocket_client
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent
from twisted.web.resource import Resource

from broadcaster.core.identity import AuthDenied, AuthUnavailable, Identity
from broadcaster.http.tokens import (
    JWKS,
    EitherAuthenticator,
    TokenAuthenticator,
    parse_jwks,
    public_key,
    secret_key,
    token_from,
)
from broadcaster.service.secrets import WORKER_JWT_SECRET
from broadcaster.service.tap import Options
from tests.http.test_auth import AuthService
from tests.http.test_webhooks import serve
from tests.support import close_client, connect_client, start_server

#: The clock of the unit tests: an hour of tokens either side of it.
NOW = 1_700_000_000

SECRET = "jwt-secret-0b7e51c2d94f4a8e9a3c6d21f08e7b55"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(private_key) -> bytes:
    """The PEM of a private key's public half."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(private_key, kid: str, **extra) -> dict:
    """The public JWK of a private key."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        key = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        key = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**key, "kid": kid, **extra}


def claims(**overrides) -> dict:
    """A valid token's claims at :data:`NOW`, with ``overrides`` (``None`` drops one)."""
    base = {"sub": "u-1842", "exp": NOW + 600, "iat": NOW}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict, secret: str = SECRET, **headers) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def rs256(payload: dict, key=RSA_KEY, **headers) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers=headers or None)


def es256(payload: dict, key=EC_KEY, **headers) -> str:
    return jwt.encode(payload, key, algorithm="ES256", headers=headers or None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forged(header: dict, payload: dict, mac_key: bytes = b"") -> str:
    """
    A token made by hand, as an attacker would, not by PyJWT (which
    refuses to make these): HMAC-SHA256 with ``mac_key``, or no signature
    for ``alg: none``.
    """
    signing_input = "{}.{}".format(
        _b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode())
    )
    if header.get("alg") == "none":
        return signing_input + "."
    mac = hmac.new(mac_key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + _b64(mac)


class TokenChecks(SynchronousTestCase):
    """
    Shared by the unit tests: a verifier on a ``Clock`` at :data:`NOW`.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    def verifier(self, keys=None, **kwargs) -> TokenAuthenticator:
        if keys is None:
            keys = [secret_key(SECRET.encode()), public_key(pem(RSA_KEY)), public_key(pem(EC_KEY))]
        return TokenAuthenticator(keys, self.clock, **kwargs)

    def accepted(self, token: str, verifier=None) -> Identity:
        return self.successResultOf((verifier or self.verifier()).verify(token))

    def refused(self, token: str, verifier=None) -> str:
        """The reason a token is refused with; it must not quote the token."""
        failure = self.failureResultOf((verifier or self.verifier()).verify(token), AuthDenied)
        self.assertEqual(failure.value.status, 403)
        if token:
            self.assertNotIn(token, failure.value.reason)
        return failure.value.reason


class SignatureTests(TokenChecks):
    def test_each_algorithm_admits_with_its_sub(self):
        """HS256, RS256 and ES256 tokens signed with the configured keys admit
        their sub as user, an identity that came from a token."""
        for token in (hs256(claims()), rs256(claims()), es256(claims())):
            self.assertEqual(
                self.accepted(token),
                Identity(user="u-1842", expires=float(NOW + 600), from_token=True),
            )

    def test_name_and_rooms_are_carried(self):
        """name becomes the display name (trimmed, as hello trims it); rooms is kept as given."""
        rooms = {"lobby": ["read"], "ops": ["read", "write"]}
        identity = self.accepted(hs256(claims(name="  Ann  ", rooms=rooms)))
        self.assertEqual((identity.user, identity.name, identity.rooms), ("u-1842", "Ann", rooms))
        self.assertEqual(self.accepted(hs256(claims(rooms=["lobby"]))).rooms, ["lobby"])
        self.assertEqual(
            hash(identity), hash(Identity("u-1842", "Ann", None, NOW + 600.0, from_token=True))
        )

    def test_wrong_signature(self):
        """A token signed with another secret or another RSA key is refused: bad signature."""
        self.assertEqual(self.refused(hs256(claims(), secret=SECRET[::-1])), "bad signature")
        self.assertEqual(self.refused(rs256(claims(), key=OTHER_RSA_KEY)), "bad signature")
        token = hs256(claims())
        head, payload, signature = token.split(".")
        tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
        tampered["sub"] = "admin"
        token = ".".join([head, _b64(json.dumps(tampered).encode()), signature])
        self.assertEqual(self.refused(token), "bad signature")

    def test_alg_none_is_refused(self):
        """An unsigned token (alg none, in any case) is refused whatever it claims."""
        for alg in ("none", "None", "NONE"):
            reason = self.refused(forged({"alg": alg, "typ": "JWT"}, claims()))
            self.assertEqual(reason, "algorithm {} not accepted".format(alg))

    def test_hs256_made_with_the_public_key_is_refused(self):
        """The algorithm-confusion attack: an HS256 token whose MAC key is the
        public key's PEM is refused, with or without a secret configured."""
        for key in (RSA_KEY, EC_KEY):
            token = forged({"alg": "HS256", "typ": "JWT"}, claims(), mac_key=pem(key))
            only_public = self.verifier([public_key(pem(key))])
            self.assertEqual(
                self.refused(token, only_public),
                "signed with HS256, for which no key is configured",
            )
            self.assertEqual(self.refused(token), "bad signature")

    def test_a_key_checks_only_its_own_algorithm(self):
        """An RS256 token is not checked with an ES256 key, nor the other way round."""
        verifier = self.verifier([public_key(pem(EC_KEY))])
        self.assertEqual(
            self.refused(rs256(claims()), verifier),
            "signed with RS256, for which no key is configured",
        )

    def test_other_algorithms_are_refused(self):
        """Algorithms other than HS256, RS256 and ES256 are refused, even with a valid signature."""
        token = jwt.encode(claims(), SECRET + "-longer-for-hs512" * 4, algorithm="HS512")
        self.assertEqual(self.refused(token), "algorithm HS512 not accepted")
        token = forged({"alg": "../../etc/passwd"}, claims())
        self.assertEqual(self.refused(token), "algorithm ? not accepted")

    def test_malformed_tokens(self):
        """Garbage, an empty token and a token with a non-string kid are refused as malformed."""
        for token in ("", "abc", "a.b.c", hs256(claims()).replace(".", "", 1)):
            self.assertTrue(self.refused(token).startswith("malformed token"), token)
        token = forged({"alg": "HS256", "kid": 7}, claims(), mac_key=SECRET.encode())
        self.assertTrue(self.refused(token).startswith("malformed token"))


class ClaimTests(TokenChecks):
    def test_expired_by_the_clock(self):
        """A token is refused once exp is more than the leeway (30 s) in the past."""
        verifier = self.verifier()
        token = hs256(claims(exp=NOW + 60))
        self.clock.advance(60 + 29)
        self.accepted(token, verifier)
        self.clock.advance(1)
        self.assertEqual(self.refused(token, verifier), "the token has expired")

    def test_leeway_is_configurable(self):
        """--jwt-leeway 0 refuses a token the moment exp passes."""
        verifier = self.verifier(leeway=0)
        token = hs256(claims(exp=NOW + 60))
        self.clock.advance(59.5)
        self.accepted(token, verifier)
        self.clock.advance(0.5)
        self.assertEqual(self.refused(token, verifier), "the token has expired")

    def test_not_yet_valid_by_the_clock(self):
        """nbf or iat more than the leeway ahead refuses the token until the clock is there."""
        verifier = self.verifier()
        early = hs256(claims(nbf=NOW + 100))
        from_the_future = hs256(claims(iat=NOW + 100))
        self.assertEqual(self.refused(early, verifier), "the token is not valid yet (nbf)")
        self.assertEqual(
            self.refused(from_the_future, verifier),
            "the token is not valid yet (iat in the future)",
        )
        self.clock.advance(70)
        self.accepted(early, verifier)
        self.accepted(from_the_future, verifier)

    def test_exp_is_required_unless_allowed(self):
        """A token without exp is refused, unless --jwt-allow-no-exp."""
        token = hs256(claims(exp=None))
        self.assertEqual(self.refused(token), 'missing "exp" claim')
        self.assertIsNone(self.accepted(token, self.verifier(require_exp=False)).expires)

    def test_times_must_be_numbers(self):
        """An exp, nbf or iat that is not a number is refused."""
        for claim in ("exp", "nbf", "iat"):
            for value in ("soon", True, [1]):
                reason = self.refused(hs256(claims(**{claim: value})))
                self.assertIn('"{}"'.format(claim), reason)

    def test_sub_is_required_and_checked(self):
        """sub must be there, a string, and usable as a user id."""
        self.assertEqual(self.refused(hs256(claims(sub=None))), 'missing "sub" claim')
        self.assertEqual(self.refused(hs256(claims(sub=42))), 'bad "sub" claim: not a string')
        self.assertIn('unusable "sub" claim', self.refused(hs256(claims(sub="   "))))
        self.assertIn('unusable "sub" claim', self.refused(hs256(claims(sub="a\u202eb"))))

    def test_bad_name_is_refused(self):
        """A name that hello would refuse (too long, control characters...) refuses the token."""
        for name in ("x" * 33, "Ann\nBob", 7, ""):
            reason = self.refused(hs256(claims(name=name)))
            self.assertTrue(reason.startswith('unusable "name" claim'), reason)
        longer = self.verifier(max_name_length=40)
        self.assertEqual(self.accepted(hs256(claims(name="x" * 40)), longer).name, "x" * 40)

    def test_bad_rooms_is_refused(self):
        """rooms must be a JSON list or object."""
        for rooms in ("lobby", 3, True):
            reason = self.refused(hs256(claims(rooms=rooms)))
            self.assertEqual(reason, 'unusable "rooms" claim: not a list or an object')

    def test_audience(self):
        """With --jwt-audience, aud must name it (alone or in a list); else it is not checked."""
        verifier = self.verifier(audience="chat")
        self.accepted(hs256(claims(aud="chat")), verifier)
        self.accepted(hs256(claims(aud=["billing", "chat"])), verifier)
        self.assertEqual(self.refused(hs256(claims(aud="billing")), verifier), "wrong audience")
        self.assertEqual(self.refused(hs256(claims()), verifier), 'missing "aud" claim')
        self.accepted(hs256(claims(aud="billing")))

    def test_issuer(self):
        """With --jwt-issuer, iss must be it; without, iss is not checked."""
        verifier = self.verifier(issuer="https://id.example")
        self.accepted(hs256(claims(iss="https://id.example")), verifier)
        self.assertEqual(
            self.refused(hs256(claims(iss="https://evil.example")), verifier), "wrong issuer"
        )
        self.assertEqual(self.refused(hs256(claims()), verifier), 'missing "iss" claim')
        self.accepted(hs256(claims(iss="https://evil.example")))


class TokenSourceTests(SynchronousTestCase):
    def test_bearer_header(self):
        """Authorization: Bearer gives the token, the scheme in any case."""
        for value in ("Bearer t.o.k", "bearer t.o.k", "  BEARER   t.o.k  "):
            self.assertEqual(token_from({}, {"authorization": value}), "t.o.k")

    def test_query(self):
        """Without a Bearer header, the last ?token= gives it."""
        self.assertEqual(token_from({"token": ["a", "b"]}, {}), "b")
        self.assertEqual(token_from({"token": ["q"]}, {"authorization": "Basic eDp5"}), "q")

    def test_header_beats_query(self):
        """With both, the header's token is the one checked."""
        self.assertEqual(token_from({"token": ["q"]}, {"authorization": "Bearer h"}), "h")

    def test_no_token(self):
        """Another scheme or no credentials at all is no token; an empty Bearer is an empty one."""
        self.assertIsNone(token_from({"name": ["ann"]}, {"authorization": "Basic eDp5"}))
        self.assertIsNone(token_from({}, {"cookie": "sid=1"}))
        self.assertEqual(token_from({}, {"authorization": "Bearer"}), "")

    def test_authenticate_reads_the_handshake(self):
        """authenticate checks the handshake's token; a handshake without one is refused."""
        clock = Clock()
        clock.advance(NOW)
        verifier = TokenAuthenticator([secret_key(SECRET.encode())], clock)
        token = hs256(claims())
        identity = self.successResultOf(
            verifier.authenticate("tcp4:1.2.3.4:5", "/", {"token": [token]}, None, {})
        )
        self.assertEqual(identity.user, "u-1842")
        failure = self.failureResultOf(
            verifier.authenticate("tcp4:1.2.3.4:5", "/", {}, None, {}), AuthDenied
        )
        self.assertIn("no token", failure.value.reason)


class RecordingAuthenticator:
    """
    Stands in for the ``--auth-url`` client (the real one is exercised end
    to end below): records the handshakes it is asked about.
    """

    def __init__(self) -> None:
        self.asked: List[dict] = []

    def setServiceParent(self, parent) -> None:
        pass

    def authenticate(self, peer, path, query, origin, headers):
        self.asked.append(dict(query=query, headers=headers))
        return succeed(Identity(user="from-the-service"))


class EitherAuthenticatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        self.service = RecordingAuthenticator()
        self.either = EitherAuthenticator(
            TokenAuthenticator([secret_key(SECRET.encode())], clock), self.service
        )

    def ask(self, query, headers):
        return self.either.authenticate("tcp4:1.2.3.4:5", "/", query, None, headers)

    def test_a_token_wins(self):
        """A handshake with a token is checked as a JWT, good or bad, never by the service."""
        bearer = {"authorization": "Bearer " + hs256(claims())}
        identity = self.successResultOf(self.ask({}, bearer))
        self.assertEqual(identity.user, "u-1842")
        self.failureResultOf(self.ask({"token": ["nonsense"]}, {}), AuthDenied)
        self.failureResultOf(self.ask({}, {"authorization": "Bearer"}), AuthDenied)
        self.assertEqual(self.service.asked, [])

    def test_no_token_goes_to_the_service(self):
        """A handshake without a token (a cookie, Basic) is asked of --auth-url."""
        identity = self.successResultOf(self.ask({}, {"authorization": "Basic eDp5"}))
        self.assertEqual(identity.user, "from-the-service")
        self.assertEqual(len(self.service.asked), 1)
        self.assertFalse(identity.from_token)

    def test_a_refresh_token_is_checked_as_a_jwt(self):
        """A token given on an open connection is verified as a JWT, never sent to the service."""
        identity = self.successResultOf(self.either.verify(hs256(claims(sub="u-5"))))
        self.assertEqual((identity.user, identity.from_token), ("u-5", True))
        self.failureResultOf(self.either.verify("nonsense"), AuthDenied)
        self.assertEqual(self.service.asked, [])


class KeyLoadingTests(SynchronousTestCase):
    def test_short_secret_is_refused(self):
        """A secret shorter than 32 bytes is refused, saying how long it is, not what it is."""
        error = self.assertRaises(ValueError, secret_key, b"short-secret")
        self.assertIn("at least 32 bytes", str(error))
        self.assertNotIn("short-secret", str(error))

    def test_public_keys(self):
        """A 2048-bit RSA key is RS256, a P-256 key ES256; others and private keys are refused."""
        self.assertEqual(public_key(pem(RSA_KEY)).algorithm, "RS256")
        self.assertEqual(public_key(pem(EC_KEY)).algorithm, "ES256")
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.assertRaises(ValueError, public_key, pem(small))
        self.assertRaises(ValueError, public_key, pem(ec.generate_private_key(ec.SECP384R1())))
        private = RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.assertRaises(ValueError, public_key, private)
        self.assertRaises(ValueError, public_key, b"not a key")

    def test_jwks_keeps_only_signing_keys_it_may_use(self):
        """Of a JWKS, only RSA and P-256 signing keys whose alg is theirs are kept."""
        oct_key = {"kty": "oct", "k": _b64(SECRET.encode()), "kid": "oct"}
        document = {
            "keys": [
                jwk(RSA_KEY, "rsa"),
                jwk(EC_KEY, "ec", alg="ES256", use="sig"),
                oct_key,
                jwk(OTHER_RSA_KEY, "enc", use="enc"),
                jwk(OTHER_RSA_KEY, "confused", alg="HS256"),
                jwk(ec.generate_private_key(ec.SECP384R1()), "p384"),
                "nonsense",
            ]
        }
        keys, skipped = parse_jwks(json.dumps(document).encode())
        self.assertEqual([(k.kid, k.algorithm) for k in keys], [("rsa", "RS256"), ("ec", "ES256")])
        self.assertEqual(skipped, 5)
        self.assertRaises(ValueError, parse_jwks, b"[]")
        self.assertRaises(ValueError, parse_jwks, b"<html>")


class JWKSServer(Resource):
    """
    A JWKS URL: serves :attr:`keys` and counts the requests.
    """

    isLeaf = True

    def __init__(self, *keys) -> None:
        super().__init__()
        self.keys = list(keys)
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


class JWKSTests(TestCase):
    """
    A real local JWKS server; the rate of fetches counted on a ``Clock``.
    """

    def setUp(self) -> None:
        self.server = JWKSServer(jwk(RSA_KEY, "k1"))
        self.url = serve(self, self.server).url + "/jwks.json"
        self.clock = Clock()
        self.clock.advance(NOW)
        self.jwks = JWKS(
            self.url, HTTPClient(Agent(reactor)), self.clock, min_interval=30.0
        )
        self.verifier = TokenAuthenticator([], self.clock, jwks=self.jwks)

    @inlineCallbacks
    def test_rotation(self):
        """A token with a kid the server has just started serving triggers
        one fetch and is accepted; the old key still works."""
        identity = yield self.verifier.verify(rs256(claims(), kid="k1"))
        self.assertEqual((identity.user, self.server.requests), ("u-1842", 1))
        self.server.keys.append(jwk(EC_KEY, "k2"))
        self.clock.advance(30)
        identity = yield self.verifier.verify(es256(claims(), kid="k2"))
        self.assertEqual((identity.user, self.server.requests), ("u-1842", 2))
        yield self.verifier.verify(rs256(claims(), kid="k1"))
        self.assertEqual(self.server.requests, 2)

    @inlineCallbacks
    def test_a_flood_of_unknown_kids_fetches_at_most_once_per_interval(self):
        """Tokens with made-up kids cause one fetch (those arriving meanwhile
        wait for it), then none until --jwt-jwks-min-interval has passed."""
        yield self.verifier.verify(rs256(claims(), kid="k1"))
        self.clock.advance(30)

        def flood(count):
            attempts = []
            for _ in range(count):
                d = self.verifier.verify(rs256(claims(), kid=uuid.uuid4().hex))
                attempts.append(self.assertFailure(d, AuthDenied))
            return gatherResults(attempts)

        refusals = yield flood(50)
        self.assertEqual({e.reason for e in refusals}, {"unknown key id"})
        self.assertEqual(self.server.requests, 2)
        self.clock.advance(29)
        yield flood(50)
        self.assertEqual(self.server.requests, 2)
        self.clock.advance(1)
        yield flood(50)
        self.assertEqual(self.server.requests, 3)

    @inlineCallbacks
    def test_kid_of_another_algorithm_is_not_used(self):
        """A token naming an RSA key's kid but signed ES256 is not checked with the RSA key."""
        yield self.verifier.verify(rs256(claims(), kid="k1"))
        self.clock.advance(30)
        token = es256(claims(), kid="k1")
        failure = yield self.assertFailure(self.verifier.verify(token), AuthDenied)
        self.assertEqual(failure.reason, "unknown key id")

    @inlineCallbacks
    def test_a_jwks_without_usable_keys_is_unavailable(self):
        """With no keys ever fetched, a token cannot be checked: 503, not 403."""
        self.server.keys = [{"kty": "oct", "k": _b64(SECRET.encode())}]
        failure = yield self.assertFailure(
            self.verifier.verify(rs256(claims(), kid="k1")), AuthUnavailable
        )
        self.assertIn("no RS256 or ES256 signing key", str(failure))

    @inlineCallbacks
    def test_unreachable_jwks_is_unavailable(self):
        """Nothing listening at the JWKS URL: the token cannot be checked, 503."""
        closed = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        url = "http://127.0.0.1:{}/jwks".format(closed.getHost().port)
        yield closed.stopListening()
        verifier = TokenAuthenticator(
            [], self.clock, jwks=JWKS(url, HTTPClient(Agent(reactor)), self.clock)
        )
        failure = yield self.assertFailure(
            verifier.verify(rs256(claims(), kid="k1")), AuthUnavailable
        )
        self.assertIn("could not connect", str(failure))


class JWKSScheduleTests(SynchronousTestCase):
    """
    When the keys are fetched while the service runs, with ``StubTreq``.
    """

    def test_fetched_at_start_and_every_refresh(self):
        """Started, the JWKS is fetched at once and then every --jwt-jwks-refresh seconds."""
        server = JWKSServer(jwk(RSA_KEY, "k1"))
        clock = Clock()
        jwks = JWKS("https://id.example/jwks", StubTreq(server), clock, refresh_interval=600)
        jwks.startService()
        self.assertEqual((server.requests, jwks.problem), (1, None))
        clock.advance(599)
        self.assertEqual(server.requests, 1)
        clock.advance(1)
        self.assertEqual(server.requests, 2)
        jwks.stopService()
        clock.advance(600)
        self.assertEqual(server.requests, 2)

    def test_a_failed_refresh_keeps_the_keys(self):
        """A refresh that fails keeps the keys already known, and logs why."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        server = JWKSServer(jwk(RSA_KEY, "k1"))
        clock = Clock()
        clock.advance(NOW)
        jwks = JWKS("https://id.example/jwks", StubTreq(server), clock, refresh_interval=600)
        jwks.startService()
        self.addCleanup(jwks.stopService)
        server.keys = []
        clock.advance(600)
        verifier = TokenAuthenticator([], clock, jwks=jwks)
        identity = self.successResultOf(verifier.verify(rs256(claims(), kid="k1")))
        self.assertEqual(identity.user, "u-1842")
        errors = [e for e in logged if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["reason"], "the JWKS holds no RS256 or ES256 signing key")


def handshake_status(port: int, path: str = "/", headers=()) -> "Deferred":
    """
    Try a WebSocket handshake (websocket-client, in a thread).

    :return: a Deferred firing with 101 if it succeeded, else the HTTP status.
    """

    def attempt():
        try:
            ws = websocket_client.create_connection(
                "ws://127.0.0.1:{}{}".format(port, path), header=list(headers), timeout=10
            )
        except websocket_client.WebSocketBadStatusException as e:
            return e.status_code
        ws.close()
        return 101

    return deferToThread(attempt)


def live_claims(**overrides) -> dict:
    """Claims valid now, by the wall clock (the real server's)."""
    now = int(time.time())
    return {**claims(exp=now + 600, iat=now), **overrides}


class SignedInTestCase(TestCase):
    """
    Real servers with the --jwt-* flags, real clients: no token or secret
    may be logged.
    """

    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.tokens: List[str] = []

    def tearDown(self) -> None:
        for event in self.logged:
            text = repr(event) + (formatEvent(event) or "")
            for secret in [SECRET] + self.tokens:
                self.assertNotIn(secret, text, "a token or a secret was logged")
                signature = secret.rsplit(".", 1)[-1]
                if signature:
                    self.assertNotIn(signature, text, "a token's signature was logged")

    def token(self, maker, *args, **kwargs) -> str:
        token = maker(*args, **kwargs)
        self.tokens.append(token)
        return token

    def write(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o600)
        return path

    def jwt_flags(self) -> List[str]:
        return [
            "--jwt-secret-file", self.write(SECRET.encode() + b"\n"),
            "--jwt-public-key", self.write(pem(RSA_KEY)),
        ]

    @inlineCallbacks
    def read(self, client, kind, timeout=10.0, **fields):
        """The next event of type ``kind`` (with ``fields``) ``client`` receives; others skipped."""
        deadline = time.monotonic() + timeout
        while True:
            event = yield client.next_json(timeout=max(deadline - time.monotonic(), 0.01))
            if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
                return event


class HandshakeTests(SignedInTestCase):
    """
    Who gets in with which token.
    """

    @inlineCallbacks
    def test_bearer_and_query_tokens_are_admitted(self):
        """A client with Authorization: Bearer and one with ?token= are
        admitted; their welcome carries the token's sub as user, and its name."""
        service, port = yield start_server(self, self.jwt_flags())
        header = self.token(hs256, live_claims(name="Ann"))
        client = yield connect_client(
            self,
            port,
            json_mode=True,
            path="/?name=bob",
            headers={"Authorization": "Bearer " + header},
        )
        welcome = yield client.next_json()
        self.assertEqual((welcome["user"], welcome["name"]), ("u-1842", "Ann"))

        query = self.token(rs256, live_claims(sub="u-77"))
        other = yield connect_client(
            self, port, json_mode=True, path="/?name=bob&token=" + query
        )
        welcome = yield other.next_json()
        self.assertEqual((welcome["user"], welcome["name"]), ("u-77", "bob"))
        connects = [e for e in self.logged if "[CONNECT]" in e.get("log_format", "")]
        self.assertEqual([e.get("user") for e in connects], ["u-1842", "u-77"])
        # The raw ports are off: their clients could not sign in.
        self.assertEqual((service.image_endpoint, service.line_endpoint), (None, None))

    @inlineCallbacks
    def test_bad_tokens_get_403_and_a_reason_in_the_log(self):
        """Expired, wrongly signed, unsigned and missing tokens get 403, each
        logged with why, and never the token."""
        service, port = yield start_server(self, self.jwt_flags())
        now = int(time.time())
        cases = [
            (self.token(hs256, live_claims(exp=now - 3600)), "the token has expired"),
            (self.token(hs256, live_claims(), secret=SECRET[::-1]), "bad signature"),
            (self.token(forged, {"alg": "none"}, live_claims()), "algorithm none not accepted"),
            (
                self.token(forged, {"alg": "HS256"}, live_claims(), mac_key=pem(RSA_KEY)),
                "bad signature",
            ),
        ]
        for token, _ in cases:
            status = yield handshake_status(port, headers=["Authorization: Bearer " + token])
            self.assertEqual(status, 403)
        status = yield handshake_status(port, path="/?token=" + cases[0][0])
        self.assertEqual(status, 403)
        self.assertEqual((yield handshake_status(port)), 403)
        line = "[REFUSED] {peer}: {reason}; answered 403"
        refusals = [e for e in self.logged if e.get("log_format") == line]
        self.assertEqual(
            [e["reason"] for e in refusals],
            [reason for _, reason in cases]
            + ["the token has expired", "no token (neither a Bearer credential nor ?token=)"],
        )
        self.assertEqual({e["log_level"] for e in refusals}, {LogLevel.warn})
        self.assertEqual(service.hub.stats.refused_handshakes["auth"], 6)

    @inlineCallbacks
    def test_jwks_keys_admit(self):
        """With --jwt-jwks-url, a token signed with a key of the set is admitted."""
        jwks = serve(self, JWKSServer(jwk(EC_KEY, "k1")))
        service, port = yield start_server(self, ["--jwt-jwks-url", jwks.url + "/jwks"])
        token = self.token(es256, live_claims(), kid="k1")
        client = yield connect_client(
            self, port, json_mode=True, headers={"Authorization": "Bearer " + token}
        )
        welcome = yield client.next_json()
        self.assertEqual(welcome["user"], "u-1842")
        unknown = self.token(es256, live_claims(), kid="k9")
        self.assertEqual(
            (yield handshake_status(port, headers=["Authorization: Bearer " + unknown])), 403
        )

    @inlineCallbacks
    def test_with_auth_url_a_token_wins(self):
        """With --auth-url as well: a token is checked as a JWT and the
        service is not asked, good token or bad; no token goes to the service."""
        auth = AuthService(body=json.dumps({"user": "from-the-service"}).encode())
        auth_server = serve(self, auth)
        service, port = yield start_server(
            self, ["--auth-url", auth_server.url + "/check", *self.jwt_flags()]
        )
        good = self.token(hs256, live_claims())
        client = yield connect_client(self, port, json_mode=True, path="/?token=" + good)
        self.assertEqual((yield client.next_json())["user"], "u-1842")
        bad = self.token(hs256, live_claims(), secret=SECRET[::-1])
        self.assertEqual(
            (yield handshake_status(port, headers=["Authorization: Bearer " + bad])), 403
        )
        self.assertEqual(auth.asked, [])

        other = yield connect_client(
            self, port, json_mode=True, headers={"Cookie": "sid=cookie-1"}
        )
        self.assertEqual((yield other.next_json())["user"], "from-the-service")
        (asked,) = auth.asked
        self.assertEqual(asked["headers"], {"cookie": "sid=cookie-1"})


class OptionsTests(SynchronousTestCase):
    def write(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def parse(self, *args, environ=None):
        options = Options(environ={} if environ is None else environ)
        options.parseOptions(list(args))
        return options

    def refused(self, *args) -> str:
        return str(self.assertRaises(UsageError, self.parse, *args))

    def test_keys_are_read_at_start_up(self):
        """The secret and the public key are read when the options are parsed."""
        options = self.parse(
            "--jwt-secret-file", self.write(SECRET.encode() + b"\r\n"),
            "--jwt-public-key", self.write(pem(EC_KEY)),
        )
        self.assertEqual([k.algorithm for k in options["jwt-keys"]], ["HS256", "ES256"])
        self.assertEqual(options["jwt-keys"][0].key, SECRET.encode())
        self.assertEqual(options["closed-for-auth"], ["image-port", "line-port"])

    def test_defaults(self):
        """Without --jwt-* flags no key is configured; the limits have their documented defaults."""
        options = self.parse()
        self.assertEqual(options["jwt-keys"], [])
        self.assertEqual(
            (
                options["jwt-leeway"],
                options["jwt-jwks-timeout"],
                options["jwt-jwks-refresh"],
                options["jwt-jwks-min-interval"],
                options["jwt-allow-no-exp"],
            ),
            (30.0, 5.0, 3600.0, 30.0, 0),
        )

    def test_short_secret_is_refused_without_showing_it(self):
        """A secret file of under 32 bytes stops start-up, naming the flag and not the secret."""
        error = self.refused("--jwt-secret-file", self.write(b"tiny-secret\n"))
        self.assertIn("--jwt-secret-file", error)
        self.assertIn("at least 32 bytes", error)
        self.assertNotIn("tiny-secret", error)

    def test_unreadable_files_name_the_flag(self):
        """A missing secret or key file is a usage error naming the flag and the path."""
        for flag in ("--jwt-secret-file", "--jwt-public-key"):
            path = self.mktemp()
            error = self.refused(flag, path)
            self.assertIn("{} {!r} cannot be read".format(flag, path), error)

    def test_bad_public_key_names_the_flag(self):
        """A file that is not an RS256 or ES256 public key is refused, naming the flag."""
        private = RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        error = self.refused("--jwt-public-key", self.write(private))
        self.assertIn("--jwt-public-key", error)
        self.assertIn("not a PEM public key", error)
        self.assertNotIn("PRIVATE", error)

    def test_jwks_url_and_timeout(self):
        """--jwt-jwks-url must be http(s), and its timeout shorter than the handshake's."""
        self.assertIn("--jwt-jwks-url", self.refused("--jwt-jwks-url", "ftp://id.example/jwks"))
        error = self.refused(
            "--jwt-jwks-url", "https://id.example/jwks", "--jwt-jwks-timeout", "10"
        )
        self.assertIn("--jwt-jwks-timeout", error)

    def test_audience_needs_a_key(self):
        """--jwt-audience or --jwt-issuer without a key to check tokens with is a mistake."""
        for flag in ("--jwt-audience", "--jwt-issuer"):
            self.assertIn(flag, self.refused(flag, "chat"))

    def test_workers_get_the_secret_in_their_environment(self):
        """A --workers master keeps --jwt-secret-file off its workers' command
        lines and hands them the secret in their environment."""
        master = self.parse(
            "--workers", "2", "--redis", "unix:/run/r.sock",
            "--jwt-secret-file", self.write(SECRET.encode()),
        )
        self.assertNotIn("--jwt-secret-file", master["worker-args"])
        self.assertEqual(master["worker-env"][WORKER_JWT_SECRET], SECRET)
        worker = self.parse(
            *master["worker-args"], "--workers", "1", "--worker-fds", "port=3",
            "--node-id", "m-w0", environ={WORKER_JWT_SECRET: SECRET},
        )
        self.assertEqual([k.key for k in worker["jwt-keys"]], [SECRET.encode()])
        self.assertEqual(worker["closed-for-auth"], ["image-port", "line-port"])
        single = self.parse(environ={WORKER_JWT_SECRET: SECRET})
        self.assertEqual(single["jwt-keys"], [])


class RoomRightsTests(SignedInTestCase):
    """The support desk of the docs, signed in with real tokens: customers
    see only their own room, staff see all, announcements are staff-only."""

    CUSTOMER_ROOMS = {
        "support-u1842": ["join", "publish", "history"],
        "announcements": ["join", "history"],
    }

    @inlineCallbacks
    def test_support_desk(self):
        service, port = yield start_server(self, self.jwt_flags())
        staff_token = self.token(hs256, live_claims(sub="staff-1", name="Sam"))
        customer_token = self.token(
            hs256, live_claims(sub="u-1842", name="Cus", rooms=self.CUSTOMER_ROOMS)
        )
        staff = yield connect_client(
            self, port, json_mode=True, headers={"Authorization": "Bearer " + staff_token}
        )
        staff_welcome = yield staff.next_json()
        self.assertEqual(staff_welcome["rights"], ["join", "publish", "history", "presence"])
        customer = yield connect_client(
            self, port, json_mode=True, path="/?token=" + customer_token
        )
        welcome = yield customer.next_json()
        # Not in the lobby: it sees nobody there and nobody sees it.
        self.assertEqual((welcome["rights"], welcome["count"]), ([], 1))
        self.assertEqual(service.hub.rooms_of(welcome["id"]), [])

        customer.send_json({"type": "join", "room": "support-u1842", "ref": 1})
        joined = yield self.read(customer, "presence", room="support-u1842")
        self.assertEqual(joined["rights"], ["join", "publish", "history"])
        # Without the presence right it sees only itself: its user's seat.
        self.assertEqual(joined["members"], [{"user": "u-1842", "name": "Cus", "connections": 1}])
        for request, reason in (
            ({"type": "join", "room": "support-u1843"}, "not allowed to join room 'support-u1843'"),
            ({"type": "join", "room": "lobby"}, "not allowed to join room 'lobby'"),
            ({"type": "who", "room": "support-u1842"}, "not allowed to see who is in room 'support-u1842'"),
        ):
            customer.send_json({**request, "ref": reason})
            error = yield self.read(customer, "error", ref=reason)
            self.assertEqual(error["reason"], reason)

        for client in (staff, customer):
            client.send_json({"type": "join", "room": "announcements"})
            yield self.read(client, "presence", room="announcements")
        customer.send_json({"type": "message", "room": "announcements", "text": "me too", "ref": 2})
        error = yield self.read(customer, "error", ref=2)
        self.assertEqual(error["reason"], "not allowed to publish in room 'announcements'")
        staff.send_json({"type": "message", "room": "announcements", "text": "we open at 9"})
        heard = yield self.read(customer, "message", room="announcements")
        self.assertEqual(heard["text"], "we open at 9")

        staff.send_json({"type": "join", "room": "support-u1842"})
        yield self.read(staff, "presence", room="support-u1842")
        customer.send_json({"type": "message", "room": "support-u1842", "text": "help"})
        heard = yield self.read(staff, "message", room="support-u1842")
        self.assertEqual((heard["text"], heard["name"]), ("help", "Cus"))
        forbidden = [e for e in self.logged if "[FORBIDDEN]" in e.get("log_format", "")]
        self.assertEqual(len(forbidden), 4)

    @inlineCallbacks
    def test_without_presence_nobody_is_seen_coming(self):
        """A customer in the announcements room hears the messages but not
        who joins and leaves there; staff see both."""
        _, port = yield start_server(self, self.jwt_flags())
        staff = yield connect_client(
            self, port, json_mode=True,
            path="/?token=" + self.token(hs256, live_claims(sub="staff-1", name="Sam")),
        )
        customers = []
        for user in ("u-1", "u-2"):
            token = self.token(hs256, live_claims(sub=user, rooms=self.CUSTOMER_ROOMS))
            customer = yield connect_client(self, port, json_mode=True, path="/?token=" + token)
            customer.send_json({"type": "join", "room": "announcements"})
            yield self.read(customer, "presence", room="announcements")
            customers.append(customer)
        staff.send_json({"type": "join", "room": "announcements"})
        yield self.read(staff, "presence", room="announcements")
        yield close_client(customers[1])
        staff.send_json({"type": "message", "room": "announcements", "text": "open"})
        seen = []
        while not seen or seen[-1].get("text") != "open":
            seen.append((yield customers[0].next_json()))
        self.assertEqual(
            [e["type"] for e in seen if e.get("room") == "announcements"], ["message"]
        )
        told = yield self.read(staff, "leave", room="announcements")
        self.assertEqual(told["user"], "u-2")

    @inlineCallbacks
    def test_unusable_rooms_are_refused(self):
        """A token whose rooms name an unknown right is refused at the
        handshake (403), not given more or less than was meant."""
        _, port = yield start_server(self, self.jwt_flags())
        token = self.token(hs256, live_claims(rooms={"lobby": ["join", "admin"]}))
        status = yield handshake_status(port, "/?token=" + token)
        self.assertEqual(status, 403)
        refused = [e for e in self.logged if "unusable rooms" in e.get("log_format", "")]
        self.assertEqual(len(refused), 1)


class RawSignInTests(SignedInTestCase):
    """A line-bridge client signs in with a first line AUTH <token>."""

    @inlineCallbacks
    def nc(self, port):
        from tests.support import connect_raw
        from tests.test_hostile import LineClient

        client = yield connect_raw(self, port, LineClient)
        return client

    @inlineCallbacks
    def test_auth_line(self):
        """A good token signs the client in with its rights; lines sent with
        the AUTH line wait for it; a bad token is refused and closed; a
        client that does not sign in has the anonymous rights (the lobby)."""
        from tests.support import port_of, wait_for

        service, _ = yield start_server(self, [*self.jwt_flags(), "--anonymous-raw-ports"])
        port = port_of(service.line_endpoint)
        good = self.token(hs256, live_claims(sub="u-9", name="Nia", rooms=["lobby"]))
        nia = yield self.nc(port)
        nia.transport.write("AUTH {}\nhello from nia\n".format(good).encode())
        yield wait_for(lambda: "hello from nia" in nia.received(), what="nia's line back")
        lines = nia.received().splitlines()
        self.assertIn("OK signed in as u-9", lines)
        self.assertLess(lines.index("OK signed in as u-9"), len(lines) - 1)
        self.assertTrue(lines[-1].endswith(": hello from nia"), lines)

        elsewhere = self.token(hs256, live_claims(sub="u-10", rooms=["desk-*"]))
        outsider = yield self.nc(port)
        outsider.transport.write("AUTH {}\nhi lobby\n".format(elsewhere).encode())
        yield wait_for(lambda: "ERROR" in outsider.received(), what="the refusal")
        self.assertIn("ERROR not in room 'lobby': join it first", outsider.received())

        bad = self.token(hs256, live_claims(sub="u-11"), secret="x" * 40)
        mallory = yield self.nc(port)
        mallory.transport.write("AUTH {}\nspam\n".format(bad).encode())
        yield mallory.closed
        self.assertIn("ERROR authentication failed; closing", mallory.received())
        self.assertNotIn("spam", nia.received())

        anonymous = yield self.nc(port)
        anonymous.transport.write(b"just passing\n")
        yield wait_for(lambda: "just passing" in anonymous.received(), what="the anonymous line")


class TokenRefreshTests(SignedInTestCase):
    """
    A real server with --token-refresh-window 1 and --jwt-leeway 0, real
    clients signed in with tokens that expire 2.5 s after they connect.
    """

    @inlineCallbacks
    def test_expiring_then_refresh_or_close(self):
        """Each JSON client hears expiring about a second before exp; the one that
        refreshes outlives the first exp, the one that does not is closed with 4001,
        and so is a plain client, which cannot refresh."""
        _, port = yield start_server(
            self, [*self.jwt_flags(), "--token-refresh-window", "1", "--jwt-leeway", "0"]
        )
        exp = time.time() + 2.5
        short = self.token(hs256, live_claims(exp=exp))
        bearer = {"Authorization": "Bearer " + short}
        keeper = yield connect_client(self, port, json_mode=True, headers=bearer)
        silent = yield connect_client(self, port, json_mode=True, headers=bearer)
        plain = yield connect_client(self, port, headers=bearer)

        expiring = yield self.read(keeper, "expiring", timeout=5)
        self.assertEqual(expiring["expires"], exp)
        self.assertTrue(0 <= expiring["in"] <= 1, expiring)
        fresh_exp = time.time() + 60
        keeper.send_json(
            {"type": "refresh", "token": self.token(hs256, live_claims(exp=fresh_exp)), "ref": "r"}
        )
        refreshed = yield self.read(keeper, "refreshed", timeout=5)
        self.assertEqual((refreshed["expires"], refreshed["ref"]), (fresh_exp, "r"))

        yield self.read(silent, "expiring", timeout=5)
        for client in (silent, plain):
            # Bounded: exp is 2.5 s after the connect.
            clean, code, reason = yield client.closed.addTimeout(5, reactor)
            self.assertEqual((code, reason), (4001, "token expired"))
        self.assertGreater(time.time(), exp)
        keeper.send_json({"type": "message", "text": "still here", "ref": 1})
        yield self.read(keeper, "ack", timeout=5, ref=1)
        expired = [e for e in self.logged if "[TOKEN EXPIRED]" in e.get("log_format", "")]
        self.assertEqual(len(expired), 2)


class ImagePortSignInTests(SignedInTestCase):
    """An image-port client signs in with a first frame AUTH <token>."""

    @inlineCallbacks
    def test_auth_frame(self):
        """On the image port the first frame AUTH <token> signs in: frames
        sent with it wait for it; a token without the lobby may not
        publish images there; a bad token is refused and closed."""
        from tests.core.test_imaging import make_image
        from tests.support import FrameClient, connect_raw, port_of

        service, _ = yield start_server(self, [*self.jwt_flags(), "--anonymous-raw-ports"])
        port = port_of(service.image_endpoint)
        watcher = yield connect_raw(self, port, FrameClient)
        camera = yield connect_raw(self, port, FrameClient)
        good = self.token(hs256, live_claims(sub="cam-1", rooms=["lobby"]))
        camera.send_frame(b"AUTH " + good.encode())
        camera.send_frame(make_image("PNG", size=(3, 2)))
        self.assertEqual((yield camera.next()), b"OK signed in as cam-1")
        png = yield watcher.next()
        self.assertTrue(png.startswith(b"\x89PNG"))

        elsewhere = self.token(hs256, live_claims(sub="cam-2", rooms=["desk-*"]))
        outsider = yield connect_raw(self, port, FrameClient)
        outsider.send_frame(b"AUTH " + elsewhere.encode())
        self.assertEqual((yield outsider.next()), b"OK signed in as cam-2")
        outsider.send_frame(make_image("PNG", size=(3, 2)))
        self.assertEqual(
            (yield outsider.next()), b"ERROR not allowed to publish in room 'lobby'"
        )

        bad = self.token(hs256, live_claims(sub="cam-3"), secret="y" * 40)
        mallory = yield connect_raw(self, port, FrameClient)
        mallory.send_frame(b"AUTH " + bad.encode())
        self.assertEqual((yield mallory.next()), b"ERROR authentication failed; closing")
        yield mallory.closed


class PublishWithTokenTests(SignedInTestCase):
    """POST /api/publish with a signed token instead of an API key."""

    @inlineCallbacks
    def post(self, port, token, body):
        import json as _json

        import treq

        response = yield treq.post(
            "http://127.0.0.1:{}/api/publish".format(port),
            data=_json.dumps(body).encode(),
            headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
            persistent=False,
        )
        answer = yield response.json()
        return response.code, answer

    @inlineCallbacks
    def test_publish_within_the_token_s_rooms(self):
        """A token whose rooms grant publish in 'news' publishes there (a
        member hears it), not in the lobby (403); a bad token is 401; no
        API key is configured at all."""
        service, port = yield start_server(self, self.jwt_flags())
        reader = yield connect_client(
            self, port, json_mode=True,
            headers={"Authorization": "Bearer " + self.token(hs256, live_claims(sub="r-1"))},
        )
        self.assertEqual((yield reader.next_json())["type"], "welcome")
        reader.send_json({"type": "join", "room": "news"})
        newsroom = self.token(hs256, live_claims(sub="bot-1", rooms={"news": ["join", "publish"]}))
        code, answer = yield self.post(port, newsroom, {"room": "news", "text": "extra!"})
        self.assertEqual((code, answer["room"]), (202, "news"))
        while True:
            event = yield reader.next_json()
            if event["type"] == "message":
                break
        self.assertEqual((event["room"], event["text"]), ("news", "extra!"))
        code, answer = yield self.post(port, newsroom, {"text": "to everyone"})
        self.assertEqual((code, answer["error"]), (403, "not allowed to publish in room 'lobby'"))
        forged = self.token(hs256, live_claims(sub="bot-2"), secret="z" * 40)
        code, _ = yield self.post(port, forged, {"text": "spam"})
        self.assertEqual(code, 401)


class EveryRightTests(SignedInTestCase):
    """Each right refused on each request that needs it, for a client whose
    token grants the room 'quiet' with join alone, and the lobby with join
    and history: an error with the ref, the connection kept."""

    @inlineCallbacks
    def read(self, client, kind, **fields):
        while True:
            payload, binary = yield client.next()
            if binary:
                continue
            event = json.loads(payload)
            if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
                return event

    @inlineCallbacks
    def test_every_request_is_checked(self):
        service, port = yield start_server(self, self.jwt_flags())
        rooms = {"quiet": ["join"], "lobby": ["join", "history"]}
        client = yield connect_client(
            self, port, json_mode=True,
            headers={"Authorization": "Bearer " + self.token(hs256, live_claims(rooms=rooms))},
        )
        welcome = yield self.read(client, "welcome")
        self.assertEqual(welcome["rights"], ["join", "history"])
        client.send_json({"type": "join", "room": "quiet", "since": {"epoch": "e", "seq": 0}, "ref": "since"})
        joined = yield self.read(client, "presence", room="quiet")
        self.assertEqual(joined["rights"], ["join"])
        refusals = {
            "since": "not allowed to read the history of room 'quiet'",
            "history": "not allowed to read the history of room 'quiet'",
            "who": "not allowed to see who is in room 'quiet'",
            "message": "not allowed to publish in room 'quiet'",
            "lobby message": "not allowed to publish in room 'lobby'",
            "image_url": "not allowed to publish in room 'lobby'",
        }
        client.send_json({"type": "history", "room": "quiet", "ref": "history"})
        client.send_json({"type": "who", "room": "quiet", "ref": "who"})
        client.send_json({"type": "message", "room": "quiet", "text": "psst", "ref": "message"})
        client.send_json({"type": "message", "text": "hello all", "ref": "lobby message"})
        client.send_json({"type": "image_url", "url": "https://example.com/a.png", "ref": "image_url"})
        for ref, reason in refusals.items():
            error = yield self.read(client, "error", ref=ref)
            self.assertEqual(error["reason"], reason, ref)
        # What it may do, it still can: the lobby's history.
        client.send_json({"type": "history", "ref": "ok"})
        answer = yield self.read(client, "history", room="lobby")
        self.assertEqual(answer["messages"], [])
        self.assertEqual(service.hub.stats.forbidden, len(refusals))
