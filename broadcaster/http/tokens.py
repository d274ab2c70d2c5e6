"""
Sign-in with signed connection tokens (JWT, RFC 7519): ``--jwt-secret-file``,
``--jwt-public-key``, ``--jwt-jwks-url``.

Where the token comes from, in this order:

- ``Authorization: Bearer <jwt>`` (scripts, native clients);
- ``?token=<jwt>`` in the handshake's URL (browsers cannot set headers on a
  WebSocket); the last one if there are several.

A handshake with an ``Authorization`` header whose scheme is ``Bearer``, or
with a ``?token=`` parameter, *carries a token*, even an empty or malformed
one.

Which keys check it.  The token's ``alg`` header chooses among the keys of
that algorithm only, so a key is never used with an algorithm it was not
configured for:

======  ==================================================================
HS256   the ``--jwt-secret-file`` secret (at least :data:`MIN_SECRET_SIZE`
        bytes)
RS256   the ``--jwt-public-key`` RSA key (2048 bits or more), and the RSA
        keys of the ``--jwt-jwks-url`` set
ES256   the ``--jwt-public-key`` P-256 key, and the P-256 keys of the set
======  ==================================================================

Every other ``alg`` is refused, ``none`` first among them; so is HS256 when
no secret is configured, which is what defeats the algorithm-confusion
attack (an HS256 token "signed" with the bytes of a public key).  A token
with a ``kid`` is checked against the set's key of that id only; without
one, against each of the set's keys of its algorithm.  The configured
public key ignores ``kid``.  A token is accepted if any configured key
verifies it.

The JWKS (:class:`JWKS`) is fetched with treq, never a blocking client: at
start-up, every ``--jwt-jwks-refresh`` seconds, and when a token names a
``kid`` the set does not hold, at most once every
``--jwt-jwks-min-interval`` seconds, so that tokens with made-up ``kid``
values cannot make the server hammer the URL (the handshakes that arrive
while a fetch is under way wait for it rather than start another).  A
failed fetch keeps the keys already known.  Handshakes wait at most
``--jwt-jwks-timeout`` seconds for a fetch.

Claims, once the signature verifies:

- ``sub``, required: the user id (``user`` in the ``welcome``, webhooks and
  logs), at most :data:`~broadcaster.http.auth.MAX_USER_LENGTH` characters
  of the kind a display name may hold;
- ``exp``, required unless ``--jwt-allow-no-exp``; ``nbf`` and ``iat``
  when present; each a number of seconds since the epoch, honoured with
  ``--jwt-leeway`` seconds of slack for clocks that disagree (default 30);
- ``aud``, checked when ``--jwt-audience`` is set (a string or a list that
  holds it); ``iss``, checked when ``--jwt-issuer`` is set;
- ``name``, optional: the display name, checked as ``hello`` checks one;
  it beats ``?name=`` and ``hello`` cannot change it;
- ``rooms``, optional: a JSON list or object, kept as given on the
  :class:`~broadcaster.core.identity.Identity` for room permissions.

A token that fails any of this is refused with :class:`AuthDenied` (HTTP
403) and a short reason for the log (``"the token has expired"``, ``"bad
signature"``, ``"unknown key id"``...), never the token.  No keys to check
with (the JWKS never fetched) is :class:`AuthUnavailable` (HTTP 503).

With ``--auth-url`` as well (:class:`EitherAuthenticator`): *the token
wins*.  A handshake that carries a token is checked as a JWT and nothing
else, whatever the verdict; one that carries none is asked of the
``--auth-url`` service.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Tuple

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from broadcaster.core.fetching import describe_url
from broadcaster.core.identity import AuthDenied, AuthUnavailable, Identity
from broadcaster.core.names import InvalidName, check_display_name, check_user_id
from broadcaster.http.auth import MAX_USER_LENGTH
from broadcaster.http.outgoing import describe_http_failure, exchange

#: The algorithms a token may be signed with.
ALGORITHMS = ("HS256", "RS256", "ES256")

#: The shortest ``--jwt-secret-file`` secret, in bytes: as long as the
#: hash, as RFC 7518 (3.2) requires of an HS256 key.
MIN_SECRET_SIZE = 32

#: The smallest RSA key accepted, in bits.
MIN_RSA_BITS = 2048

#: The largest JWKS document read, in bytes.
MAX_JWKS_SIZE = 256 * 1024

#: The answer for a token that did not verify (its reason is logged).
DENIED = 403

_BEARER = re.compile(r"(?i)^\s*bearer(?:\s+(.*?))?\s*$")


def token_from(query: Mapping[str, List[str]], headers: Mapping[str, str]) -> Optional[str]:
    """
    The token a handshake carries: ``Authorization: Bearer``'s, else the
    last ``?token=``; ``""`` for a Bearer header without one.

    :param headers: names in lower case.
    :return: the token, or ``None`` if the handshake carries none.
    """
    authorization = headers.get("authorization")
    if authorization is not None:
        match = _BEARER.match(authorization)
        if match is not None:
            return match.group(1) or ""
    tokens = query.get("token")
    if tokens:
        return tokens[-1]
    return None


def key_algorithm(key: Any) -> Optional[str]:
    """
    The one algorithm ``key`` may check tokens with: RS256 for an RSA
    public key of :data:`MIN_RSA_BITS` or more, ES256 for a P-256 one.

    :return: the algorithm, or ``None`` for any other key.
    """
    if isinstance(key, RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return "RS256"
    if isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1):
        return "ES256"
    return None


@dataclass(frozen=True)
class VerificationKey:
    """
    A key that checks tokens of one algorithm.

    :ivar algorithm: of :data:`ALGORITHMS`.
    :ivar key: the HS256 secret (bytes), or a ``cryptography`` public key.
    :ivar kid: its key id, for a key of the JWKS.
    """

    algorithm: str
    key: Any
    kid: Optional[str] = None


def secret_key(secret: bytes) -> VerificationKey:
    """
    The HS256 key for a shared secret.

    :raise ValueError: if it is shorter than :data:`MIN_SECRET_SIZE`
        bytes (saying so, not what it holds).
    """
    if len(secret) < MIN_SECRET_SIZE:
        raise ValueError(
            "an HS256 secret must be at least {} bytes; this one has {}".format(
                MIN_SECRET_SIZE, len(secret)
            )
        )
    return VerificationKey("HS256", secret)


def public_key(pem: bytes) -> VerificationKey:
    """
    The RS256 or ES256 key of a PEM public key (``BEGIN PUBLIC KEY``).

    :raise ValueError: if it is not one, or not an RSA key of
        :data:`MIN_RSA_BITS` bits or more or a P-256 key.
    """
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise ValueError("it is not a PEM public key (BEGIN PUBLIC KEY)") from None
    algorithm = key_algorithm(key)
    if algorithm is None:
        raise ValueError(
            "only RSA keys of {} bits or more (RS256) and P-256 keys (ES256)"
            " are accepted".format(MIN_RSA_BITS)
        )
    return VerificationKey(algorithm, key)


def parse_jwks(body: bytes) -> Tuple[List[VerificationKey], int]:
    """
    The signing keys of a JWKS document (RFC 7517) that tokens may be
    checked with: RSA and P-256 public keys whose ``alg``, if given, is
    theirs, and whose ``use``, if given, is ``sig``.

    :return: the keys, and how many others were skipped.
    :raise ValueError: if ``body`` is not a JSON object with a ``keys`` list.
    """
    try:
        document = json.loads(body)
    except ValueError:
        raise ValueError("the JWKS is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('the JWKS is not a JSON object with a "keys" list')
    keys: List[VerificationKey] = []
    skipped = 0
    for entry in document["keys"]:
        key = _jwk(entry)
        if key is None:
            skipped += 1
        else:
            keys.append(key)
    return keys, skipped


def _jwk(entry: Any) -> Optional[VerificationKey]:
    if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
        # "oct" above all: a shared secret has no place in a public set.
        return None
    if entry.get("use", "sig") != "sig":
        return None
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        parsed = jwt.PyJWK(entry)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    algorithm = key_algorithm(parsed.key)
    if algorithm is None or parsed.algorithm_name != algorithm:
        return None
    return VerificationKey(algorithm, parsed.key, kid)


class JWKS(Service):
    """
    The keys at ``--jwt-jwks-url``, fetched at start-up, every
    ``refresh_interval`` seconds, and for a ``kid`` not yet known at most
    once every ``min_interval`` seconds.

    :param client: a treq-like client (``get``).
    :param timeout: seconds for one fetch (``--jwt-jwks-timeout``).
    :param refresh_interval: seconds between fetches while all is well
        (``--jwt-jwks-refresh``), so that keys removed from the set stop
        being accepted.
    :param min_interval: the fewest seconds between two fetches started
        for unknown ``kid`` values (``--jwt-jwks-min-interval``).

    :ivar fetches: how many fetches were started.
    :ivar problem: why the keys may be out of date (none fetched yet, or
        the last fetch failed), or ``None``: a token whose key is not among
        them then cannot be told apart from a forgery.
    """

    _log = Logger()

    def __init__(
        self,
        url: str,
        client,
        clock: IReactorTime,
        timeout: float = 5.0,
        refresh_interval: float = 3600.0,
        min_interval: float = 30.0,
    ) -> None:
        self.url = url
        self.target = describe_url(url)
        self._client = client
        self._clock = clock
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self.min_interval = min_interval
        self._keys: List[VerificationKey] = []
        self._started_at: Optional[float] = None
        self._fetching: Optional[Deferred] = None
        self._waiting: List[Deferred] = []
        self._loop: Optional[LoopingCall] = None
        self._stopping = False
        self.fetches = 0
        self.problem: Optional[str] = "the keys have not been fetched yet"

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._refresh)
        self._loop.clock = self._clock
        self._loop.start(self.refresh_interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._fetching is not None:
            self._stopping = True
            self._fetching.cancel()

    def _refresh(self) -> None:
        if self._fetching is None:
            self._fetch()

    def keys(self, algorithm: str, kid: Optional[str]) -> Deferred:
        """
        The keys that may have signed a token: of ``algorithm``, and of id
        ``kid`` if it is not ``None``.  When there are none, a fetch is
        waited for if one is under way, or started if the last began at
        least ``min_interval`` seconds ago.

        :return: a Deferred firing with a list of :class:`VerificationKey`,
            perhaps empty.
        """
        found = self._matching(algorithm, kid)
        if found:
            return succeed(found)
        if self._fetching is None:
            if (
                self._started_at is not None
                and self._clock.seconds() - self._started_at < self.min_interval
            ):
                return succeed([])
            self._fetch()
            if self._fetching is None:  # answered at once
                return succeed(self._matching(algorithm, kid))
        waiter: Deferred = Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        waiter.addCallback(lambda _: self._matching(algorithm, kid))
        return waiter

    def _matching(self, algorithm: str, kid: Optional[str]) -> List[VerificationKey]:
        return [
            key
            for key in self._keys
            if key.algorithm == algorithm and (kid is None or key.kid == kid)
        ]

    def _fetch(self) -> None:
        self._started_at = self._clock.seconds()
        self.fetches += 1
        d = exchange(
            self._client,
            self._clock,
            "get",
            self.url,
            self.timeout,
            MAX_JWKS_SIZE,
            {b"Accept": [b"application/json"]},
        )
        d.addCallback(self._fetched)
        d.addErrback(self._failed)
        d.addBoth(self._done)
        # Set last: a client that answers at once has finished by now.
        if not d.called:
            self._fetching = d

    def _fetched(self, answer) -> None:
        code, body = answer
        if not 200 <= code < 300:
            raise ValueError("the JWKS URL answered HTTP {}".format(code))
        keys, skipped = parse_jwks(body)
        if not keys:
            raise ValueError("the JWKS holds no RS256 or ES256 signing key")
        self._keys = keys
        self.problem = None
        self._log.info(
            "[JWKS] {count} keys from {url}, {skipped} others skipped",
            count=len(keys),
            url=self.target,
            skipped=skipped,
        )

    def _failed(self, failure: Failure) -> None:
        if self._stopping or failure.check(CancelledError):
            # treq reports a cancelled request as a broken connection.
            return
        if failure.check(ValueError):
            reason = str(failure.value)
        else:
            reason = describe_http_failure(failure, self.timeout)
        self.problem = "the JWKS could not be fetched from {}: {}".format(self.target, reason)
        self._log.error(
            "[JWKS] could not fetch the keys from {url}: {reason}; {known} known keys kept",
            url=self.target,
            reason=reason,
            known=len(self._keys),
        )

    def _done(self, _) -> None:
        self._fetching = None
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)


# What a PyJWT refusal of a token whose signature verified is logged as.
_CLAIM_ERRORS: Tuple[Tuple[type, str], ...] = (
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.exceptions.InvalidSubjectError, 'bad "sub" claim: not a string'),
)


class TokenAuthenticator(MultiService):
    """
    Checks the token each handshake carries; answers as
    :class:`~broadcaster.http.auth.Authenticator` does.

    A service so that the JWKS (a child) is fetched while it runs.

    :param keys: the ``--jwt-secret-file`` and ``--jwt-public-key`` keys.
    :param jwks: the ``--jwt-jwks-url`` keys, or ``None``.
    :param clock: what ``exp``, ``nbf`` and ``iat`` are compared with.
    :param audience: the ``aud`` required (``--jwt-audience``), or ``None``.
    :param issuer: the ``iss`` required (``--jwt-issuer``), or ``None``.
    :param require_exp: refuse tokens without ``exp`` (unless
        ``--jwt-allow-no-exp``).
    :param leeway: seconds of slack for ``exp``, ``nbf`` and ``iat``
        (``--jwt-leeway``).
    :param max_name_length: the longest display name, as for ``hello``.
    """

    def __init__(
        self,
        keys: Iterable[VerificationKey],
        clock: IReactorTime,
        jwks: Optional[JWKS] = None,
        audience: Optional[str] = None,
        issuer: Optional[str] = None,
        require_exp: bool = True,
        leeway: float = 30.0,
        max_name_length: int = 32,
    ) -> None:
        super().__init__()
        self._keys = list(keys)
        self._clock = clock
        self.jwks = jwks
        if jwks is not None:
            jwks.setServiceParent(self)
        self.audience = audience
        self.issuer = issuer
        self.require_exp = require_exp
        self.leeway = leeway
        self.max_name_length = max_name_length

    def authenticate(
        self,
        peer: str,
        path: str,
        query: Mapping[str, List[str]],
        origin: Optional[str],
        headers: Mapping[str, str],
    ) -> Deferred:
        """
        Check the token one handshake carries (see :func:`token_from`).

        :param headers: the request's headers, names in lower case.
        :return: a Deferred firing with an :class:`Identity`, or failing
            with :class:`AuthDenied` (no token, or one that does not
            verify) or :class:`AuthUnavailable`.
        """
        token = token_from(query, headers)
        if token is None:
            return fail(AuthDenied(DENIED, "no token (neither a Bearer credential nor ?token=)"))
        return self.verify(token)

    def verify(self, token: str) -> Deferred:
        """
        Check one token: its signature, then its claims.  The token of a
        handshake and that of a ``refresh`` on an open connection are
        checked alike, so that renewing cannot let in what signing in
        would not.

        :return: as :meth:`authenticate`.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return fail(AuthDenied(DENIED, "malformed token"))
        algorithm = header.get("alg")
        kid = header.get("kid")
        if algorithm not in ALGORITHMS:
            return fail(AuthDenied(DENIED, "algorithm {} not accepted".format(_shown(algorithm))))
        if kid is not None and not isinstance(kid, str):
            return fail(AuthDenied(DENIED, "malformed token: kid is not a string"))
        try:
            identity = self._check(token, [k for k in self._keys if k.algorithm == algorithm])
        except AuthDenied as e:
            return fail(e)
        if identity is not None:
            return succeed(identity)
        if self.jwks is None or algorithm == "HS256":
            if not any(k.algorithm == algorithm for k in self._keys):
                return fail(
                    AuthDenied(
                        DENIED, "signed with {}, for which no key is configured".format(algorithm)
                    )
                )
            return fail(AuthDenied(DENIED, "bad signature"))
        d = self.jwks.keys(algorithm, kid)
        d.addCallback(self._checked_by_jwks, token, kid)
        return d

    def _checked_by_jwks(self, keys: List[VerificationKey], token: str, kid: Optional[str]):
        if not keys:
            if self.jwks.problem is not None:
                raise AuthUnavailable(self.jwks.problem)
            if kid is not None:
                raise AuthDenied(DENIED, "unknown key id")
            raise AuthDenied(DENIED, "bad signature")
        identity = self._check(token, keys)
        if identity is None:
            raise AuthDenied(DENIED, "bad signature")
        return identity

    def _check(self, token: str, keys: List[VerificationKey]) -> Optional[Identity]:
        """
        The identity of the token if one of ``keys`` verifies it, else
        ``None``.

        :raise AuthDenied: if the token is malformed, or a key verifies it
            and its claims are wrong.
        """
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    audience=self.audience,
                    issuer=self.issuer,
                    options={
                        # Against the injected clock, below.
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": self.audience is not None,
                        "verify_iss": self.issuer is not None,
                        "verify_sub": True,
                        "verify_jti": False,
                        "require": ["sub", "exp"] if self.require_exp else ["sub"],
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.MissingRequiredClaimError as e:
                raise AuthDenied(DENIED, 'missing "{}" claim'.format(e.claim)) from None
            except jwt.DecodeError:
                raise AuthDenied(DENIED, "malformed token") from None
            except jwt.PyJWTError as e:
                for error, reason in _CLAIM_ERRORS:
                    if isinstance(e, error):
                        raise AuthDenied(DENIED, reason) from None
                raise AuthDenied(DENIED, "invalid token ({})".format(type(e).__name__)) from None
            return self._identity(claims)
        return None

    def _identity(self, claims: dict) -> Identity:
        now = self._clock.seconds()
        times = {}
        for claim in ("exp", "nbf", "iat"):
            value = claims.get(claim)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AuthDenied(DENIED, 'bad "{}" claim: not a number'.format(claim))
            if not math.isfinite(value):
                raise AuthDenied(DENIED, 'bad "{}" claim: not a finite number'.format(claim))
            times[claim] = float(value)
        if "exp" in times and times["exp"] <= now - self.leeway:
            raise AuthDenied(DENIED, "the token has expired")
        if "nbf" in times and times["nbf"] > now + self.leeway:
            raise AuthDenied(DENIED, "the token is not valid yet (nbf)")
        if "iat" in times and times["iat"] > now + self.leeway:
            raise AuthDenied(DENIED, "the token is not valid yet (iat in the future)")
        try:
            user = check_user_id(claims["sub"], MAX_USER_LENGTH)
        except InvalidName as e:
            raise AuthDenied(DENIED, 'unusable "sub" claim: {}'.format(e)) from None
        name = claims.get("name")
        if name is not None:
            try:
                name = check_display_name(name, self.max_name_length)
            except InvalidName as e:
                raise AuthDenied(DENIED, 'unusable "name" claim: {}'.format(e)) from None
        rooms = claims.get("rooms")
        if rooms is not None and not isinstance(rooms, (list, dict)):
            raise AuthDenied(DENIED, 'unusable "rooms" claim: not a list or an object')
        return Identity(
            user=user, name=name, rooms=rooms, expires=times.get("exp"), from_token=True
        )


def _shown(algorithm: object) -> str:
    """
    An ``alg`` header for the log: its name if it looks like one, else
    ``?`` (it comes from the client).
    """
    if isinstance(algorithm, str) and algorithm.isalnum() and len(algorithm) <= 16:
        return algorithm
    return "?"


class EitherAuthenticator(MultiService):
    """
    ``--jwt-*`` and ``--auth-url`` together: a handshake that carries a
    token (see :func:`token_from`) is checked as a JWT only; one that
    carries none is asked of the auth service.  The token wins.

    :param tokens: the :class:`TokenAuthenticator`.
    :param service: the ``--auth-url``
        :class:`~broadcaster.http.auth.Authenticator`.
    """

    def __init__(self, tokens: TokenAuthenticator, service) -> None:
        super().__init__()
        self.tokens = tokens
        self.service = service
        tokens.setServiceParent(self)
        service.setServiceParent(self)

    def authenticate(
        self,
        peer: str,
        path: str,
        query: Mapping[str, List[str]],
        origin: Optional[str],
        headers: Mapping[str, str],
    ) -> Deferred:
        """
        As :meth:`TokenAuthenticator.authenticate`, for a handshake with a
        token; else as :meth:`~broadcaster.http.auth.Authenticator.authenticate`.
        """
        if token_from(query, headers) is not None:
            chosen = self.tokens
        else:
            chosen = self.service
        return chosen.authenticate(peer, path, query, origin, headers)

    def verify(self, token: str) -> Deferred:
        """
        Check a token given on an open connection (``refresh``), as
        :meth:`TokenAuthenticator.verify` does: only a connection that
        signed in with a token renews its sign-in, so the service is never
        asked.
        """
        return self.tokens.verify(token)
