"""
The one admission policy for clients that arrive over HTTP: the WebSocket
handshake (:mod:`broadcaster.protocols.websocket`) and the event stream
(:mod:`broadcaster.protocols.stream`) pass the same checks, in the same
order, logged and counted alike: the ``Origin`` (``--allow-origin``),
then sign-in (``--auth-url`` or signed tokens) and what it grants, then
bans (``POST /api/disconnect``).

Each check raises :class:`Refused` with the HTTP status and the reason the
client is told; each kind of client answers it in its own terms (Autobahn's
``ConnectionDeny``, a plain HTTP answer).  The log line says why, without
secrets: never a token, only what was wrong with it.
"""

from __future__ import annotations

from typing import Optional, Tuple

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from broadcaster.core.identity import AuthDenied, AuthUnavailable, Identity
from broadcaster.core.permissions import Grants, parse_grants
from broadcaster.core.stats import Stats

#: What a banned user is told (``POST /api/disconnect`` with ``ban_seconds``).
BANNED = "disconnected by the server; try again later"

_log = Logger(namespace="broadcaster.protocols.gate")


class Refused(Exception):
    """
    A client that may not come in.

    :ivar status: the HTTP status to answer (403, 503, ...).
    :ivar reason: what the client is told.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def check_origin(policy, stats: Stats, peer: str, origin: Optional[str], host: Optional[str], secure: bool) -> None:
    """
    :raise Refused: 403, unless ``origin`` is this server's own (or
        allowed by ``--allow-origin``, or absent: not a browser).
    """
    if policy.permits(origin, host, secure):
        return
    _log.warn(
        "[REFUSED] {peer}: Origin {origin} is not this server's origin"
        " (Host {host}) nor allowed by --allow-origin; answered 403",
        peer=peer,
        origin=origin,
        host=host or "-",
    )
    stats.refused_handshakes["origin"] += 1
    raise Refused(403, "Origin {} is not allowed to connect to this server".format(origin))


def admit_identity(hub, identity: Identity, peer: str) -> Tuple[Grants, Optional[str]]:
    """
    What a client that signed in as ``identity`` may do.

    :return: its grants and user.
    :raise Refused: 403 if its ``rooms`` cannot be read (refused rather
        than given more, or less, than was meant) or its user is banned.
    """
    try:
        grants = parse_grants(identity.rooms)
    except ValueError as e:
        hub.stats.refused_handshakes["auth"] += 1
        _log.warn(
            "[REFUSED] {peer}: unusable rooms in the sign-in ({reason}); answered 403",
            peer=peer,
            reason=str(e),
        )
        raise Refused(403, "unusable rooms: {}".format(e))
    if identity.user is not None:
        refuse_if_banned(hub, identity.user, peer)
    return grants, identity.user


def refuse_if_banned(hub, user: str, peer: str) -> None:
    """
    :raise Refused: 403, if ``user`` is banned for now.
    """
    left = hub.banned(user)
    if not left:
        return
    _log.warn(
        "[REFUSED] {peer}: user {user!r} is banned for {left:.0f} more s"
        " (POST /api/disconnect); answered 403",
        peer=peer,
        user=user,
        left=left,
    )
    hub.stats.refused_handshakes["banned"] += 1
    raise Refused(403, BANNED)


def sign_in_failed(stats: Stats, failure: Failure, peer: str) -> Refused:
    """
    Sign-in did not succeed: log why (never the credential) and count it.

    :return: the refusal to answer: 403 for credentials refused, 503 when
        they could not be checked (the client is not at fault; it may retry).
    """
    if failure.check(CancelledError):
        return Refused(503, "connection lost")
    if failure.check(AuthDenied):
        if failure.value.reason is not None:
            # A token that did not verify: why is for the log, not the client.
            _log.warn("[REFUSED] {peer}: {reason}; answered 403", peer=peer, reason=failure.value.reason)
        else:
            _log.warn(
                "[REFUSED] {peer}: the auth service refused the credentials (HTTP {status});"
                " answered 403",
                peer=peer,
                status=failure.value.status,
            )
        stats.refused_handshakes["auth"] += 1
        return Refused(403, "not authorised")
    if failure.check(AuthUnavailable):
        _log.error(
            "[REFUSED] {peer}: authentication failed, {reason}; answered 503",
            peer=peer,
            reason=str(failure.value),
        )
    else:
        _log.failure(
            "[REFUSED] {peer}: authentication failed unexpectedly; answered 503", failure, peer=peer
        )
    stats.refused_handshakes["auth_unavailable"] += 1
    return Refused(503, "authentication unavailable; try again later")
