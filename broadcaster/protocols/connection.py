"""
What every kind of connection logs when it joins and leaves the hub.

WebSocket, image-port and line-bridge clients are all members of the same
chat; an operator reading the log should see them announced the same way.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from autobahn.twisted.util import peer2str
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from broadcaster.core.flow import Limits, RateLimit
from broadcaster.core.hub import Hub
from broadcaster.core.identity import AuthDenied, AuthUnavailable, Identity, SignIn
from broadcaster.core.members import MemberBase
from broadcaster.core.names import LOBBY
from broadcaster.core.permissions import EVERYTHING, JOIN, Grants, parse_grants
from broadcaster.protocols.admission import Admission, AdmittingFactory
from broadcaster.protocols.outbound import Outbound


#: Seconds a connection the server hangs up on may keep sending (unread)
#: while its client reads the last error.
LINGER_SECONDS = 2.0


def log_connect(
    log: Logger,
    client: str,
    peer: str,
    kind: str,
    count: int,
    user: Optional[str] = None,
    rooms: Optional[List[str]] = None,
    handshake: Optional[Tuple[str, str, str]] = None,
) -> None:
    """
    Log a member joining.

    :param kind: what sort of client it is (``plain``, ``json``, ``image``,
        ``line``, ``sse``).
    :param count: members connected now, this one included.
    :param user: who it signed in as, if it did.
    :param rooms: the rooms it chose (an event stream), if it did.
    :param handshake: the path, ``Origin`` and ``User-Agent`` of the
        WebSocket handshake it connected with (``-`` for a header absent):
        a handshake that opens is logged in this one line.
    """
    fields = dict(
        client=client,
        peer=peer,
        kind=kind,
        count=count,
        user=user,
        signed="" if user is None else " as user {!r}".format(user),
        chosen="" if rooms is None else " for " + ", ".join(rooms),
    )
    if handshake is None:
        log.info(
            "[CONNECT] {client} connected from {peer} ({kind}){signed}{chosen}; {count} connected",
            **fields,
        )
        return
    path, origin, agent = handshake
    log.info(
        "[CONNECT] {client} connected from {peer} ({kind}){signed} to {path} origin={origin}"
        " agent={agent!r}; {count} connected",
        path=path,
        origin=origin,
        agent=agent,
        **fields,
    )


def log_handshake(log: Logger, peer: str, handshake: Tuple[str, str, str]) -> None:
    """
    Log a WebSocket handshake that did not open (after the line saying
    why): its path, ``Origin`` and ``User-Agent``, as :func:`log_connect`
    logs those of one that did.
    """
    path, origin, agent = handshake
    log.info(
        "[HANDSHAKE] {peer} {path} origin={origin} agent={agent!r}: not opened",
        peer=peer,
        path=path,
        origin=origin,
        agent=agent,
    )


def log_disconnect(
    log: Logger,
    client: str,
    duration: float,
    count: int,
    code: Optional[int] = None,
    reason: str = "",
    clean: bool = True,
) -> None:
    """
    Log a member leaving.

    :param duration: seconds the member was connected.
    :param code: the WebSocket close code, if the connection had one.
    :param reason: why it left, as the peer or the server said.
    """
    if code is None:
        # A raw-TCP connection: no close handshake, just how TCP ended.
        log.info(
            "[DISCONNECT] {client} disconnected ({reason}) after {duration:.1f}s;"
            " {count} connected",
            client=client,
            reason=reason,
            clean=clean,
            duration=duration,
            count=count,
        )
        return
    log.info(
        "[DISCONNECT] {client} disconnected: code={code} reason={reason!r}"
        " clean={clean} after {duration:.1f}s; {count} connected",
        client=client,
        code=code,
        reason=reason,
        clean=clean,
        duration=duration,
        count=count,
    )


#: The longest ``AUTH`` line or frame taken for a sign-in (a signed token
#: is a few hundred bytes to a few KiB); a longer one is chat, or an image.
MAX_CREDENTIAL_LENGTH = 8192


def cut_slow_consumer(log: Logger, member, outbound, size: int, stats, limit: int, how: str) -> None:
    """
    ``size`` more bytes would take ``member`` past ``--max-buffer``: forget
    what waits for it, log it and count it.  The caller closes the
    connection (``how`` says how, for the log).
    """
    log.warn(
        "[SLOW CONSUMER] {client} is {queued} bytes behind and {size} more would pass"
        " --max-buffer {limit}; {how}",
        client=member.id,
        queued=outbound.cut(),
        size=size,
        limit=limit,
        how=how,
    )
    stats.slow_consumers += 1


class RawMemberProtocol(MemberBase, Protocol):
    """
    A raw-TCP connection that is a hub member for as long as it is connected.

    Subclasses set :attr:`kind` and implement ``deliver`` (with
    :meth:`send`); their factory has ``hub``, ``clock`` and ``limits``
    (:class:`broadcaster.core.flow.Limits`) attributes.

    :ivar id: the member id, allocated when the connection is made.
    :ivar peer: the peer's address, as Autobahn writes it (``tcp4:1.2.3.4:5``).
    """

    _log = Logger()
    kind = "raw"
    id: Optional[str] = None
    name: Optional[str] = None
    peer = "-"
    _connected_at = 0.0
    #: Set once the server has decided to hang up: no more input is read
    #: and nothing more is delivered.
    closing = False
    _linger = None
    _idle = None
    #: The connection's place under --max-connections (see
    #: :mod:`broadcaster.protocols.admission`), if the factory admits connections.
    ticket = None

    def close_with(self, last_words: bytes) -> None:
        """
        Send ``last_words`` (an error) and hang up, so that the client gets
        to read them.

        Closing a socket that still has unread input makes the kernel reset
        the connection, which can destroy data we sent but the client had
        not yet read.  So: send, shut down our side only (FIN), discard
        whatever the client still sends, and close for good when it does,
        or after :data:`LINGER_SECONDS`.
        """
        self.closing = True
        outbound = self._outbound
        outbound.spent = True
        outbound.write(last_words, 0)
        # Plain TCP can half-close; TLS and other transports just close.
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is None:
            outbound.lose_connection()
            return

        def half_close() -> None:
            outbound.step_aside()
            lose_write()

        outbound.when_drained(half_close)
        self._linger = self.factory.clock.callLater(LINGER_SECONDS, self.transport.abortConnection)

    #: Who signed in (``AUTH``), if anybody.
    user: Optional[str] = None
    #: Whether an ``AUTH`` is being checked: input waits meanwhile.
    signing_in = False

    def signs_in(self, first: bytes) -> bool:
        """
        If the client's first line or frame is ``AUTH <credential>`` and
        this server signs clients in, start signing it in.

        :return: whether it was that (and is not to be taken as chat or
            an image).
        """
        if (
            not first.startswith(b"AUTH ")
            or len(first) > MAX_CREDENTIAL_LENGTH
            or getattr(self.factory, "authenticator", None) is None
        ):
            return False
        self.sign_in(first[5:].decode("utf-8", "replace").strip())
        return True

    def sign_in(self, credential: str) -> None:
        """
        The client's first input was ``AUTH <credential>``: check it exactly
        as a WebSocket handshake's ``Authorization: Bearer`` credential (a
        signed token, or a question to ``--auth-url``), reading nothing
        more meanwhile.  Signed in, the client has the rights its sign-in
        gives (and is put in, or taken out of, the lobby accordingly) and
        is told :meth:`signed_in`; refused, it is told why and closed.
        """
        authenticator = getattr(self.factory, "authenticator", None)
        if authenticator is None:
            self.close_with(self.error("nobody signs in on this server; closing"))
            return
        self.signing_in = True
        self.transport.pauseProducing()
        d = authenticator.authenticate(
            self.peer, "/", {}, None, {"authorization": "Bearer " + credential}
        )
        # Rooms it cannot read refuse it (ValueError), as at a handshake.
        d.addCallback(lambda identity: (identity, parse_grants(identity.rooms)))
        d.addCallbacks(self._signed_in, self._not_signed_in)

    def _signed_in(self, checked: Tuple[Identity, Grants]) -> None:
        identity, grants = checked
        self.signing_in = False
        if self.closing or self.transport is None:
            return
        hub = self.factory.hub
        self.user = identity.user
        self.grants = grants
        in_lobby = LOBBY in hub.rooms_of(self.id)
        may_join = self.grants.allows(LOBBY, JOIN)
        if identity.name is not None and identity.name != self.name:
            self.name = identity.name
            hub.rename(self)
        if may_join and not in_lobby:
            hub.join(self, LOBBY)
        elif in_lobby and not may_join:
            hub.leave(self, LOBBY)
        self._log.info(
            "[SIGNED IN] {client} ({peer}) as user {user!r}",
            client=self.id,
            peer=self.peer,
            user=self.user,
        )
        self.send(self.signed_in())
        self.transport.resumeProducing()
        self.resume_input()

    def _not_signed_in(self, failure: Failure) -> None:
        self.signing_in = False
        if failure.check(AuthDenied, ValueError):
            reason = "authentication failed"
            detail = getattr(failure.value, "reason", None) or str(failure.value)
        elif failure.check(AuthUnavailable):
            reason = "authentication unavailable; try again later"
            detail = str(failure.value)
        else:
            self._log.failure("{client}: signing in failed unexpectedly", failure, client=self.id)
            reason = detail = "authentication unavailable; try again later"
        self.factory.hub.stats.refused_handshakes["auth"] += 1
        self._log.warn(
            "[REFUSED] {client} ({peer}): AUTH refused, {detail}",
            client=self.id,
            peer=self.peer,
            detail=detail,
        )
        if not self.closing and self.transport is not None:
            self.close_with(self.error(reason + "; closing"))

    def signed_in(self) -> bytes:
        """What a client that signed in is told (a subclass's format)."""
        return b""

    def resume_input(self) -> None:
        """Carry on with input that arrived while signing in."""

    def connectionMade(self) -> None:
        factory = self.factory
        self.peer = peer2str(self.transport)
        self.id = factory.hub.new_id()
        self._connected_at = factory.clock.seconds()
        self._outbound = Outbound(self.transport)
        self._rate = RateLimit(factory.clock, factory.limits.rate, factory.limits.burst)
        timeout = factory.limits.raw_idle_timeout
        if timeout:
            self._idle = factory.clock.callLater(timeout, self._idle_timed_out)
        # Raw-TCP clients cannot sign in: they have the anonymous rights.
        self.grants = factory.anonymous
        factory.hub.connect(self)
        log_connect(self._log, self.id, self.peer, self.kind, len(factory.hub))

    #: How this kind of client is told of an error (an ``ERROR`` line, an
    #: error frame), given the reason.
    error: Callable[[str], bytes] = staticmethod(lambda reason: b"")

    def touched(self) -> None:
        """
        The client sent something: it is not idle.
        """
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.factory.limits.raw_idle_timeout)

    def busy(self) -> bool:
        """
        Whether the server is still working on what the client sent (so
        that its silence is the server's doing, not idleness).
        """
        return False

    def _idle_timed_out(self) -> None:
        timeout = self.factory.limits.raw_idle_timeout
        if self.busy():
            self._idle = self.factory.clock.callLater(timeout, self._idle_timed_out)
            return
        self._idle = None
        self._log.info(
            "[IDLE] {client} ({peer}) sent nothing for {timeout:g}s (--raw-idle-timeout);"
            " disconnecting",
            client=self.id,
            peer=self.peer,
            timeout=timeout,
        )
        self.close_with(
            self.error("idle for {:g} s (--raw-idle-timeout); closing".format(timeout))
        )

    def send(self, *chunks: bytes) -> None:
        """
        Queue ``chunks`` for the client, unless it has fallen more than
        ``--max-buffer`` bytes behind: then it is disconnected instead, and
        the broadcast goes on without it.
        """
        if self.closing:
            return
        size = sum(len(chunk) for chunk in chunks)
        # Budgeted as one message, so that it is never sent in part.
        if not self._outbound.write_sequence(chunks, self.factory.limits.max_buffer):
            self._slow_consumer(size)
            return
        stats = self.factory.hub.stats
        stats.frames_out += 1
        stats.bytes_out += size

    def _slow_consumer(self, size: int) -> None:
        """
        ``size`` more bytes would take the client past ``--max-buffer``:
        disconnect it, and forget what waits for it.
        """
        factory = self.factory
        cut_slow_consumer(
            self._log, self, self._outbound, size, factory.hub.stats, factory.limits.max_buffer,
            "disconnecting",
        )
        self.closing = True
        self.transport.abortConnection()

    def within_rate(self, refusal: Callable[[str], bytes]) -> bool:
        """
        Whether the client may send one more message now.

        A message over ``--rate`` is refused with ``refusal(reason)`` (an
        error line or frame); a client that keeps sending past its burst is
        disconnected.
        """
        if self._rate.allow():
            return True
        self.factory.hub.stats.rate_limited += 1
        limits = self.factory.limits
        reason = "rate limit exceeded: at most {:g} messages per second (bursts of {})".format(
            limits.rate, limits.burst
        )
        if self._rate.abusive:
            self._log.warn(
                "[RATE LIMIT] {client} ({peer}) kept sending past its limit; closing",
                client=self.id,
                peer=self.peer,
            )
            self.close_with(refusal(reason + "; closing"))
            return False
        if self._rate.dropped_in_a_row == 1:
            self._log.warn(
                "[RATE LIMIT] {client} ({peer}) is over {rate:g} messages/s; dropping",
                client=self.id,
                peer=self.peer,
                rate=limits.rate,
            )
        self.send(refusal(reason + "; message dropped"))
        return False

    def shut_down(self) -> None:
        """
        The server is stopping: send what is queued, then close.
        """
        self._outbound.lose_connection()

    def abort(self) -> None:
        """
        The server is stopping and this client did not go in time.
        """
        self.transport.abortConnection()

    def expel(self, reason: str) -> bool:
        """
        The server was told to disconnect this client: tell it ``reason``
        as an error, and hang up.
        """
        if self.closing:
            return False
        self.close_with(self.error(reason))
        return True

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self.ticket is not None:
            self.ticket.release()
        hub = self.factory.hub
        hub.disconnect(self)
        log_disconnect(
            self._log,
            self.id,
            duration=self.factory.clock.seconds() - self._connected_at,
            count=len(hub),
            reason=reason.getErrorMessage() if reason is not None else "",
            clean=reason is None or reason.check(ConnectionDone) is not None,
        )


class RawMemberFactory(AdmittingFactory, ServerFactory):
    """
    What the factories of the raw-TCP ports (the line bridge, the image
    port) share: the hub their protocols join, the clock, the flow limits,
    the admission of every connection, the rights of clients that do not
    sign in, and what checks those that do (``AUTH``).

    :param anonymous: what clients that do not sign in may do
        (``--anonymous-rooms``).
    :param authenticator: checks ``AUTH`` lines and frames (as the
        WebSocket handshake's authenticator), or ``None``: nobody signs in.
    """

    noisy = False

    def __init__(
        self,
        hub: Hub,
        clock: IReactorTime,
        limits: Limits = Limits(),
        admission: Optional[Admission] = None,
        anonymous: Grants = EVERYTHING,
        authenticator: Optional[SignIn] = None,
    ) -> None:
        self.hub = hub
        self.clock = clock
        self.limits = limits
        self.admission = admission
        self.anonymous = anonymous
        self.authenticator = authenticator
