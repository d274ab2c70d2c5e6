"""
Who a client is, as a sign-in service or a signed token says, and how
asking can fail: the contract between the WebSocket handshake and whatever
signs clients in (:mod:`broadcaster.http.auth` asks an HTTP service,
``--auth-url``; :mod:`broadcaster.http.tokens` verifies signed tokens,
``--jwt-*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.defer import Deferred

#: The longest user id sign-in may name (``--auth-url``'s ``user``, a
#: token's ``sub``), and so the longest the server API can disconnect.
MAX_USER_LENGTH = 256


@dataclass(frozen=True)
class Identity:
    """
    Who the client is, as far as sign-in says; each field may be ``None``.

    :ivar user: the user id (``user`` from ``--auth-url``, a token's ``sub``).
    :ivar name: the display name sign-in chose, which ``hello`` cannot change.
    :ivar rooms: a token's ``rooms`` claim as the token gave it (a JSON list
        or object), for room permissions to read; ``None`` without one.  Not
        part of the hash, so that an identity stays hashable.
    :ivar expires: when the token stops being valid (its ``exp``, seconds
        since the epoch), or ``None``.
    :ivar from_token: whether a signed token said so, rather than a service
        asked: only such a sign-in can be renewed on an open connection
        (``refresh``), by another token of the same ``user``.
    """

    user: Optional[str] = None
    name: Optional[str] = None
    rooms: Any = field(default=None, hash=False)
    expires: Optional[float] = None
    from_token: bool = False


class AuthDenied(Exception):
    """
    Sign-in refused the client: the auth service answered 401 or 403, or a
    token did not verify.

    :ivar status: the status the auth service answered (403 for a token).
    :ivar reason: why, for the log, when there is more to say than the
        status (a token's ``"expired"``, ``"bad signature"``...); never
        holds a credential.
    """

    def __init__(self, status: int, reason: Optional[str] = None) -> None:
        super().__init__(
            reason or "the auth service refused the client (HTTP {})".format(status)
        )
        self.status = status
        self.reason = reason


class AuthUnavailable(Exception):
    """
    No usable answer from the auth service, or no keys to check a token
    with (the JWKS URL is down); ``str()`` says why (no credentials in it).
    """


class SignIn(Protocol):
    """
    What checks a client's credentials: :class:`broadcaster.http.auth.Authenticator`
    (``--auth-url``), :class:`broadcaster.http.tokens.TokenAuthenticator`
    (``--jwt-*``), or :class:`broadcaster.http.tokens.EitherAuthenticator`
    (both).  The WebSocket handshake asks it, and so does a raw-TCP
    client's ``AUTH`` line (as ``Authorization: Bearer <credential>``).
    """

    def authenticate(
        self,
        peer: str,
        path: str,
        query: Mapping[str, List[str]],
        origin: Optional[str],
        headers: Mapping[str, str],
    ) -> "Deferred":
        """
        :param headers: the request's headers, names in lower case.
        :return: a Deferred firing with an :class:`Identity`, or failing
            with :class:`AuthDenied` or :class:`AuthUnavailable`.
        """
