"""
Disconnecting clients on the server's own initiative (the server API's
``POST /api/disconnect``), and keeping a user out for a while after.

An :class:`Expulsion` names who goes: every connection of a signed-in
``user``, or one ``client`` by its id; with the reason they are told and,
for a user, the seconds during which their new connections are refused
(:class:`Bans`).  The hub carries it out on its node
(:meth:`broadcaster.core.hub.Hub.expel`) and has the backplane carry it to
every other node, which carries it out the same way.

The fields are read here, once, whether they come from the API or from
another node through Redis: a node trusts the backplane no more than the
API's callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from twisted.internet.interfaces import IReactorTime

from broadcaster.core.identity import MAX_USER_LENGTH
from broadcaster.core.names import InvalidName, check_display_name, control_character

#: What a client is told when no reason is given.
DEFAULT_REASON = "disconnected by the server"

#: The longest reason, in UTF-8 bytes: what a WebSocket close frame holds
#: (RFC 6455 5.5: 125 bytes of payload, two of them the code).
MAX_REASON_BYTES = 123

#: The longest ban: a day.  Longer is an account matter for the sign-in
#: service, which can refuse the user itself.
MAX_BAN_SECONDS = 86400

#: The longest client id named (ids are ``<node>-<n>``).
MAX_CLIENT_ID_LENGTH = 128


class InvalidExpulsion(ValueError):
    """
    An expulsion that cannot be carried out; ``str()`` says why.
    """


@dataclass(frozen=True)
class Expulsion:
    """
    Who to disconnect, and how.

    :ivar user: every connection signed in as this user, or
    :ivar client: the one connection with this id.
    :ivar reason: what the clients are told (a WebSocket close reason).
    :ivar ban_seconds: for ``user``: refuse their new connections this long.
    :ivar by: who ordered it, for the logs: an API key's id, never the key.
    """

    user: Optional[str] = None
    client: Optional[str] = None
    reason: str = DEFAULT_REASON
    ban_seconds: int = 0
    by: str = "-"

    def matches(self, member) -> bool:
        """
        Whether ``member`` (a :class:`~broadcaster.core.members.Member`) is
        one to disconnect.
        """
        if self.client is not None:
            return member.id == self.client
        return member.user == self.user

    def target(self) -> str:
        """
        Who goes, as the logs say it.
        """
        if self.client is not None:
            return "client {!r}".format(self.client)
        return "user {!r}".format(self.user)

    def ban_text(self) -> str:
        """
        The ban, as the logs say it after the target (empty without one).
        """
        return ", banned for {} s".format(self.ban_seconds) if self.ban_seconds else ""

    def fields(self) -> Dict[str, Any]:
        """
        The JSON fields it is read from (:func:`parse_expulsion`).
        """
        return {
            "user": self.user,
            "client": self.client,
            "reason": self.reason,
            "ban_seconds": self.ban_seconds,
        }


def _string(fields: Mapping[str, Any], name: str) -> Optional[str]:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidExpulsion('"{}" must be a string'.format(name))
    return value


def parse_expulsion(fields: Mapping[str, Any], by: str = "-") -> Expulsion:
    """
    Read ``{"user": ...}`` or ``{"client": ...}``, with an optional
    ``"reason"`` (1 to :data:`MAX_REASON_BYTES` UTF-8 bytes of text shown to
    the clients) and ``"ban_seconds"`` (0 to :data:`MAX_BAN_SECONDS`, for a
    user only).

    :raise InvalidExpulsion: with a reason fit to answer.
    """
    user = _string(fields, "user")
    client = _string(fields, "client")
    if (user is None) == (client is None):
        raise InvalidExpulsion('give either a "user" or a "client" id')
    if user is not None:
        try:
            user = check_display_name(user, MAX_USER_LENGTH)
        except InvalidName as e:
            raise InvalidExpulsion('"user": {}'.format(e)) from None
    elif not 1 <= len(client) <= MAX_CLIENT_ID_LENGTH:
        raise InvalidExpulsion(
            '"client" must be 1 to {} characters'.format(MAX_CLIENT_ID_LENGTH)
        )
    reason = _string(fields, "reason")
    if reason is None:
        reason = DEFAULT_REASON
    if not reason or len(reason.encode("utf-8", "surrogatepass")) > MAX_REASON_BYTES:
        raise InvalidExpulsion(
            '"reason" must be 1 to {} bytes of UTF-8 (it is sent in the close frame)'.format(
                MAX_REASON_BYTES
            )
        )
    if control_character(reason) is not None:
        raise InvalidExpulsion('"reason" must not contain control characters')
    ban = fields.get("ban_seconds", 0)
    if isinstance(ban, bool) or not isinstance(ban, int) or not 0 <= ban <= MAX_BAN_SECONDS:
        raise InvalidExpulsion(
            '"ban_seconds" must be an integer from 0 to {}'.format(MAX_BAN_SECONDS)
        )
    if ban and user is None:
        raise InvalidExpulsion('"ban_seconds" needs a "user": a client id is never reused')
    return Expulsion(user=user, client=client, reason=reason, ban_seconds=ban, by=by)


class Bans:
    """
    The users whose new connections are refused, and until when, on this
    node's clock.  A user banned again is banned until the later of the
    two ends.  Ended bans are forgotten as new ones come, so the map holds
    about as many entries as bans were ordered within a day.

    :param clock: when bans end.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._until: Dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def ban(self, user: str, seconds: float) -> None:
        """
        Refuse ``user`` for ``seconds`` from now (or longer, if already banned).
        """
        now = self._clock.seconds()
        self._until = {u: until for u, until in self._until.items() if until > now}
        self._until[user] = max(self._until.get(user, now), now + seconds)

    def remaining(self, user: str) -> float:
        """
        Seconds until ``user`` may connect again (0: now).
        """
        until = self._until.get(user)
        if until is None:
            return 0.0
        left = until - self._clock.seconds()
        if left <= 0:
            del self._until[user]
            return 0.0
        return left
