"""
When a sign-in by token ends on an open connection.

A token's ``exp`` bounds the sign-in, not only the handshake: otherwise a
token stolen, or a user whose access was withdrawn, would keep a
connection for as long as it stays up.  A connection signed in with a
token that has an ``exp`` is therefore:

- warned ``window`` seconds before ``exp`` (``--token-refresh-window``),
  at once if less than that is left when it opens (JSON clients only:
  plain clients have no channel for it);
- closed at ``exp`` plus ``leeway`` (``--jwt-leeway``), unless it renews
  its sign-in with a newer token meanwhile (``refresh``, see
  :mod:`broadcaster.protocols.websocket`), which starts over from the new
  ``exp``.  The leeway is the slack the handshake itself allows: closing
  sooner would only have the client reconnect with the very same token.

A :class:`TokenExpiry` holds one :class:`~twisted.internet.base.DelayedCall`
at a time (the warning's, then the close's), so that a connection costs
one timer, not two, and it must be cancelled when the connection is lost.
"""

from __future__ import annotations

from typing import Optional, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Expirable(Protocol):
    """
    What :class:`TokenExpiry` needs from a connection.
    """

    def token_expiring(self, expires: float, seconds: float) -> None:
        """
        Tell the client its token's ``exp`` (``expires``) is ``seconds``
        away (zero or less once passed).
        """

    def token_expired(self) -> None:
        """
        The token expired, leeway included, and no newer one came: close.
        """


class TokenExpiry:
    """
    The timer of one connection's token.

    :param connection: told when to warn and when to close.
    :param expires: the token's ``exp`` (seconds since the epoch), or
        ``None`` for a token without one: no timer then.
    :param window: seconds before ``exp`` the client is warned.
    :param leeway: seconds after ``exp`` the connection is closed.
    :param warn: whether the client can be warned at all (a plain client
        cannot); if not, only the close is scheduled.

    :ivar expires: the ``exp`` of the token in force.
    """

    __slots__ = ("_clock", "_connection", "_window", "_leeway", "_warn", "_call", "expires")

    def __init__(
        self,
        clock: IReactorTime,
        connection: Expirable,
        expires: Optional[float],
        window: float,
        leeway: float,
        warn: bool = True,
    ) -> None:
        self._clock = clock
        self._connection = connection
        self._window = window
        self._leeway = leeway
        self._warn = warn
        self._call: Optional[IDelayedCall] = None
        self.expires = expires

    @property
    def pending(self) -> bool:
        """Whether a warning or a close is scheduled."""
        return self._call is not None

    def start(self) -> None:
        """
        Schedule the warning and the close of the token in force (the
        connection has just opened).
        """
        self.renew(self.expires)

    def renew(self, expires: Optional[float]) -> None:
        """
        A newer token is in force: forget the old one's timer and schedule
        the new one's (none if it has no ``exp``).
        """
        self.cancel()
        self.expires = expires
        if expires is None:
            return
        now = self._clock.seconds()
        if not self._warn:
            self._close_later(now)
        elif expires - self._window <= now:
            self._warning()
        else:
            self._call = self._clock.callLater(expires - self._window - now, self._warning)

    def cancel(self) -> None:
        """
        Stop the timer (the connection is gone, or a newer token came).
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _warning(self) -> None:
        now = self._clock.seconds()
        # First, so that a connection lost while it is warned cancels it.
        self._close_later(now)
        self._connection.token_expiring(self.expires, self.expires - now)

    def _close_later(self, now: float) -> None:
        delay = max(0.0, self.expires + self._leeway - now)
        self._call = self._clock.callLater(delay, self._expired)

    def _expired(self) -> None:
        self._call = None
        self._connection.token_expired()
