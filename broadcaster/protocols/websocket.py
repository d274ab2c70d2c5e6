"""
The WebSocket protocol: a thin adapter between Autobahn and the hub.

Wire format (see :mod:`broadcaster.protocols.wire` for the events themselves):

- Handshake on ``/`` (query strings such as ``/?name=ann`` allowed).  Offer
  the subprotocol ``broadcaster.json`` for JSON mode; otherwise plain mode.
- A browser handshake whose ``Origin`` is neither the server's own origin nor
  one allowed with ``--allow-origin`` is refused with HTTP 403.  Handshakes
  without ``Origin`` (scripts, devices) are accepted.
- ``?name=`` sets the display name and ``?since=<epoch>:<seq>`` recovers
  the lobby; a bad value of either is refused with HTTP 400.  Beyond
  ``--max-connections`` (or ``--max-connections-per-ip``) the connection
  is answered 503 as soon as it is accepted (:mod:`broadcaster.protocols.admission`,
  :mod:`broadcaster.http.site`).
- With ``--auth-url`` (see :mod:`broadcaster.http.auth`), after those checks the
  auth service is asked: a refusal is answered 403, no usable answer 503.
  With ``--jwt-*`` (see :mod:`broadcaster.http.tokens`) a signed token is
  checked instead: one that does not verify is answered 403.  A user
  banned by ``POST /api/disconnect`` is answered 403 ("disconnected by
  the server; try again later") until the ban ends.
- A connection signed in with a token that has an ``exp`` lasts as long as
  its sign-in (see :mod:`broadcaster.protocols.expiry`): a JSON client is
  sent ``{"type": "expiring", "expires": <exp>, "in": <seconds>}``
  ``--token-refresh-window`` seconds before ``exp``, may answer
  ``{"type": "refresh", "token": <jwt>}`` with a newer token of the same
  user (checked as at the handshake; its ``rooms`` replace the old rights,
  and rooms it may no longer join are left; answered ``refreshed``), and
  is closed with 4001 at ``exp`` plus ``--jwt-leeway`` if it does not.  A
  plain client cannot refresh: it is closed then.
- JSON mode: input that is not a valid client message gets
  ``{"type": "error", "reason": ...}`` back; the connection stays open.
  ``image_url`` requests are fetched by :mod:`broadcaster.http.fetch`; a failure
  is an ``error`` to that client alone.

Close codes the server sends: 1001 shutting down; 1002 protocol error; 1007
invalid UTF-8; 1008 kept sending past ``--rate``; 1009 a message (or frame,
or decompressed message) larger than ``--max-message-size``; 4001 the
token the client signed in with expired and no newer one came; 4003
disconnected by the server (``POST /api/disconnect``), with the reason
given there; 4008 slow consumer, more than ``--max-buffer`` bytes behind.
A client that does not
answer a keepalive ping within ``--ping-timeout`` is dropped.

Logs: every handshake at info (peer, path, Origin, User-Agent), refusals at
warn, connect and disconnect at info (id, close code, reason, duration).
Per-message logs are debug only and never include payloads.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Tuple

from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from broadcaster import __version__
from broadcaster.core.identity import AuthDenied, AuthUnavailable, Identity, SignIn
from broadcaster.core.fetching import MAX_FETCHES_PER_CLIENT, FetchError, describe_url
from broadcaster.core.flow import Limits, RateLimit
from broadcaster.protocols.internals import (
    LeanWebSocketServerFactory,
    LeanWebSocketServerProtocol,
    allow_message_size,
    fan_out,
)
from broadcaster.protocols.expiry import TokenExpiry
from broadcaster.protocols.outbound import Outbound
from broadcaster.core.events import encoded, Event
from broadcaster.core.hub import Hub, NotInRoom, TooManyRooms
from broadcaster.core.permissions import (
    HISTORY,
    JOIN,
    PRESENCE,
    PUBLISH,
    EVERYTHING,
    Forbidden,
    Grants,
    parse_grants,
)
from broadcaster.core.members import MemberBase
from broadcaster.core.imaging import ImageError, NormalisedImage
from broadcaster.protocols.keepalive import Keepalive
from broadcaster.protocols.connection import (
    cut_slow_consumer,
    log_connect,
    log_disconnect,
    log_handshake,
)
from broadcaster.protocols.gate import (
    BANNED,
    Refused,
    admit_identity,
    check_origin,
    sign_in_failed,
)
from broadcaster.core.names import LOBBY, InvalidName, check_display_name
from broadcaster.core.roster import solo_seat
from broadcaster.protocols.origin import OriginPolicy
from broadcaster.protocols.wire import (
    HISTORY_REPLY_SIZE,
    JSON_SUBPROTOCOL,
    MEMBERS_PAGE,
    BadRequest,
    JSONCodec,
    PlainCodec,
    parse_client_message,
    parse_since_param,
)

#: Close code for a client that fell more than --max-buffer behind.
SLOW_CONSUMER = 4008

#: Close code for a client whose token expired (exp plus --jwt-leeway)
#: without a ``refresh``.
TOKEN_EXPIRED = 4001

# The answer to a refresh whose token could not be checked at all.
_REFRESH_UNAVAILABLE = "refresh failed: tokens cannot be checked right now; try again"

#: Close code for a client the server was told to disconnect (``POST
#: /api/disconnect``): the reason is the one given there.
DISCONNECTED = 4003

@contextmanager
def _denied():
    """
    Answer a refusal of the admission policy
    (:mod:`broadcaster.protocols.gate`) as Autobahn refuses a handshake.
    """
    try:
        yield
    except Refused as refused:
        raise ConnectionDeny(refused.status, refused.reason) from None

_PLAIN = PlainCodec()
_JSON = JSONCodec()


def _prepare(codec) -> "callable":
    """
    Build the encoder used by :func:`broadcaster.core.events.encoded`: the event in
    ``codec``'s format, framed once as Autobahn prepared messages.
    """

    def prepare(event: Event) -> List[PreparedMessage]:
        return [
            PreparedMessage(payload, is_binary, applyMask=False, doNotCompress=False)
            for payload, is_binary in codec.encode(event)
        ]

    return prepare


_PREPARE = {_PLAIN: _prepare(_PLAIN), _JSON: _prepare(_JSON)}


def _frame_batch(codec):
    """
    Build the encoder of a whole :class:`~broadcaster.core.events.EventBatch`: the
    frames of all its events, each framed once (and shared with any other
    batch or recipient), concatenated into the bytes of one write.
    """
    prepare = _PREPARE[codec]

    def frame_batch(batch) -> Tuple[bytes, int]:
        frames = [
            prepared.payloadHybi
            for event in batch
            for prepared in encoded(event, codec, prepare)
        ]
        return b"".join(frames), len(frames)

    return frame_batch


_FRAME_BATCH = {_PLAIN: _frame_batch(_PLAIN), _JSON: _frame_batch(_JSON)}


def _frame_for(batch, codec) -> Tuple[bytes, int]:
    """``batch`` framed in ``codec``'s format, once for all its clients."""
    return encoded(batch, codec, _FRAME_BATCH[codec])


class BroadcastServerProtocol(MemberBase, LeanWebSocketServerProtocol):
    """
    One WebSocket client.  It is a hub member between ``onOpen`` and ``onClose``.

    Idle connections are what a broadcast server holds most of, so their
    size is kept down (``python -m bench --scenarios S3``): Autobahn's
    per-connection state lives in slots, its options on a per-factory
    subclass (:meth:`BroadcastServerFactory.setProtocolOptions`), and the
    handshake is forgotten once the connection is open.
    """

    # Every per-connection attribute, so that no connection has an
    # instance dict; __init__ sets them all.
    __slots__ = (
        "id", "ticket", "_opened_at", "_joined", "name", "_lobby_since", "grants", "user",
        "codec", "_name_from_auth", "_auth", "_fetches", "_upload", "_expiry", "_refreshing",
        "_outbound", "_rate", "_handshake",
    )

    # Autobahn already uses ``self.log``.
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.id: Optional[str] = None
        #: The connection's place under --max-connections, taken over from
        #: the HTTP channel it upgraded (see broadcaster.protocols.admission).
        self.ticket = None
        self._opened_at = 0.0
        self._joined = False
        self.name: Optional[str] = None
        self._lobby_since: Optional[Tuple[str, int]] = None
        #: What it may do where: every right, unless sign-in says otherwise.
        self.grants: Grants = EVERYTHING
        #: Who sign-in (--auth-url, a token's sub) says this client is, if it said.
        self.user: Optional[str] = None
        self.codec = _PLAIN
        # The auth service chose the display name: hello may not change it.
        self._name_from_auth = False
        # The auth service's answer, while it is awaited.
        self._auth: Optional[Deferred] = None
        # image_url downloads and uploaded images being decoded.
        self._fetches = 0
        # An image announced by an "image" request, whose bytes are the next
        # message: (room, size, ref, why it was refused or None).
        self._upload: Optional[Tuple[str, int, object, Optional[str]]] = None
        # The timer of the token signed in with (None: not signed in with one).
        self._expiry: Optional[TokenExpiry] = None
        # A refresh's token being checked.
        self._refreshing: Optional[Deferred] = None
        # The one way out to the client, once open.
        self._outbound: Optional[Outbound] = None
        # Its --rate, made with its first message: an idle connection has
        # none (a bucket made then is as full as one made at the open).
        self._rate: Optional[RateLimit] = None
        # The handshake's path, Origin and User-Agent until they are logged.
        self._handshake: Optional[Tuple[str, str, str]] = None

    @property
    def kind(self) -> str:
        """``plain`` or ``json``, as in the logs and metrics."""
        return self.codec.name

    @property
    def lists_members(self) -> bool:
        """A JSON client is told each room's members on joining it."""
        return self.codec is _JSON

    def onConnect(self, request: ConnectionRequest) -> Optional[str]:
        headers = request.headers
        origin = headers.get("origin")
        # Logged with the connect, or after the refusal.
        self._handshake = (
            request.path,
            origin if origin is not None else "-",
            headers.get("user-agent", "-"),
        )
        secure = ISSLTransport.providedBy(self.transport)
        with _denied():
            check_origin(
                self.factory.origin_policy,
                self.factory.hub.stats,
                request.peer,
                origin,
                headers.get("host"),
                secure,
            )
        names = request.params.get("name")
        if names:
            try:
                self.name = check_display_name(names[-1], self.factory.max_name_length)
            except InvalidName as e:
                self._log.warn(
                    "[REFUSED] {peer}: bad ?name= ({reason}); answered 400",
                    peer=request.peer,
                    reason=str(e),
                )
                self.factory.hub.stats.refused_handshakes["name"] += 1
                raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "?name=: {}".format(e))
        self._lobby_since = None
        since = request.params.get("since")
        if since:
            self._lobby_since = parse_since_param(since[-1])
            if self._lobby_since is None:
                self._log.warn(
                    "[REFUSED] {peer}: bad ?since= {since!r}; answered 400",
                    peer=request.peer,
                    # Its start is enough to tell what was wrong.
                    since=since[-1][:100],
                )
                self.factory.hub.stats.refused_handshakes["since"] += 1
                raise ConnectionDeny(
                    ConnectionDeny.BAD_REQUEST,
                    "?since= must be <epoch>:<seq> from the last lobby message seen",
                )
        subprotocol = None
        if JSON_SUBPROTOCOL in request.protocols:
            self.codec = _JSON
            subprotocol = JSON_SUBPROTOCOL
        if self.factory.authenticator is not None:
            return self._authenticate(request, subprotocol)
        self.grants = self.factory.anonymous
        return subprotocol

    def failHandshake(self, reason, code=400, responseHeaders=None):
        # The refusal is logged, with why; then what was refused.
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            log_handshake(self._log, self.peer, handshake)
        super().failHandshake(reason, code, responseHeaders)

    def _authenticate(self, request: ConnectionRequest, subprotocol: Optional[str]) -> Deferred:
        """
        Ask the --auth-url service; Autobahn completes or refuses the
        handshake when the Deferred fires.
        """
        headers = request.headers
        d = self.factory.authenticator.authenticate(
            peer=request.peer,
            path=request.path,
            query=request.params,
            origin=headers.get("origin"),
            headers=headers,
        )
        self._auth = d
        d.addCallbacks(
            self._authenticated,
            self._not_authenticated,
            callbackArgs=(request.peer, subprotocol),
            errbackArgs=(request.peer,),
        )
        return d

    def _authenticated(self, identity: Identity, peer: str, subprotocol: Optional[str]):
        self._auth = None
        if self.state == self.STATE_CLOSED:
            # The client gave up (or the handshake timed out) meanwhile.
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "connection lost")
        with _denied():
            self.grants, self.user = admit_identity(self.factory.hub, identity, peer)
        if identity.from_token:
            factory = self.factory
            self._expiry = TokenExpiry(
                factory.clock,
                self,
                identity.expires,
                factory.token_refresh_window,
                factory.token_leeway,
                # Only JSON clients can be told, or refresh.
                warn=self.codec is _JSON,
            )
        if identity.name is not None:
            self.name = identity.name
            self._name_from_auth = True
        return subprotocol

    def _not_authenticated(self, failure: Failure, peer: str) -> None:
        self._auth = None
        if self.state == self.STATE_CLOSED:
            # Cancelled by connectionLost (treq reports that as a broken
            # connection, not CancelledError): nobody is left to answer.
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "connection lost")
        refused = sign_in_failed(self.factory.hub.stats, failure, peer)
        raise ConnectionDeny(refused.status, refused.reason)

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        """
        Where Autobahn writes every frame it makes (messages, pings, pongs,
        close frames): once the connection is open, through the client's
        :class:`~broadcaster.protocols.outbound.Outbound`, like everything else.
        """
        if self._outbound is not None:
            self._write(data)
            return
        super().sendData(data, sync, chopsize)

    def _write(self, data) -> bool:
        """
        Send ``data`` to the client through its one budgeted outbound path,
        or close it as a slow consumer if that would take it past
        ``--max-buffer``.

        :return: whether the bytes were queued.
        """
        if self._outbound.write(data, self.factory.limits.max_buffer):
            return True
        self._slow_consumer(len(data))
        return False

    def _reply(self, payload: bytes, is_binary: bool = False) -> None:
        """
        Send the client a message of the server's own (welcome, presence,
        history, ack, error, ...).  ``--max-message-size`` limits what
        clients send, not this: the server's replies are bounded by design
        (see :mod:`broadcaster.protocols.wire`), and go out through the same budget
        as the fan-out.
        """
        if self.state != self.STATE_OPEN:
            return
        if self._perMessageCompress is not None:
            self.send_compressed(payload, is_binary)
            return
        self._write(PreparedMessage(payload, is_binary, False, True).payloadHybi)

    def onOpen(self) -> None:
        self.forget_handshake()
        factory = self.factory
        hub = factory.hub
        self.id = hub.new_id()
        self._opened_at = factory.clock.seconds()
        self._outbound = Outbound(self.transport)
        if factory.keepalive is not None:
            factory.keepalive.add(self)
        if self.codec is _JSON:
            # The welcome says where the lobby's sequence stands; with the
            # in-process backplane the answer is immediate.
            hub.position(LOBBY).addCallback(self._welcome).addErrback(self._backplane_failed)
        else:
            self._connect()

    def _welcome(self, position: Tuple[str, int]) -> None:
        if self.state != self.STATE_OPEN:
            return
        epoch, seq = position
        hub = self.factory.hub
        if self.grants.allows(LOBBY, JOIN) and self.grants.allows(LOBBY, PRESENCE):
            # As the lobby will be once it is in: it joins after the welcome.
            members = hub.roster.seats_with(LOBBY, self)
        else:
            members = [solo_seat(self)]
        self._reply(
            _JSON.welcome(
                self, members, epoch, seq, self.factory.client_limits, rights=self.grants.listed(LOBBY)
            )
        )
        self._connect()
        if self._lobby_since is not None:
            # Recovery of the lobby asked for in the URL: with the
            # in-process backplane, replayed in the same turn as the
            # connect, so before any live message.
            epoch, seq = self._lobby_since
            hub.replay(self, LOBBY, epoch, seq).addCallback(
                lambda complete: self._reply(_JSON.recovered(LOBBY, complete))
            ).addErrback(self._backplane_failed)

    def _connect(self) -> None:
        hub = self.factory.hub
        if self.user is not None and hub.banned(self.user):
            # Banned while its welcome was on its way: it never joins.
            self.close_with(DISCONNECTED, BANNED)
            return
        hub.connect(self)
        self._joined = True
        handshake, self._handshake = self._handshake, None
        log_connect(
            self._log, self.id, self.peer, self.codec.name, len(hub), self.user, handshake=handshake
        )
        if self._expiry is not None:
            # After the welcome: it is always the first message.
            self._expiry.start()

    def _backplane_failed(self, failure, ref=None) -> None:
        """
        The backplane could not answer (e.g. Redis unreachable): tell the
        client, keep the connection.
        """
        self._log.failure(
            "{client}: backplane request failed", failure, client=self.id
        )
        if self.state == self.STATE_OPEN and self.codec is _JSON:
            self._reply(_JSON.error("temporarily unavailable, try again", ref))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != self.STATE_OPEN:
            # We are closing this client (slow consumer, flooding, shutdown):
            # what it still sends until it answers our close is ignored.
            return
        upload = self._upload
        if upload is not None:
            # The larger limit was for this one message, whatever it is.
            self._upload = None
            allow_message_size(self, None)
            if isBinary:
                self._uploaded(payload, upload)
                return
            self._upload_missing(upload)
            if len(payload) > self.factory.limits.max_message_size:
                self._refuse(
                    "a message may be at most {} bytes (--max-message-size)".format(
                        self.factory.limits.max_message_size
                    ),
                    None,
                )
                return
        rate = self._rate
        if rate is None:
            limits = self.factory.limits
            rate = self._rate = RateLimit(self.factory.clock, limits.rate, limits.burst)
        if not rate.allow():
            self._rate_limited(payload if not isBinary else None)
            return
        self.factory.hub.stats.received(self.codec.name, len(payload))
        if self.factory.debug:
            self._log.debug(
                "{client} sent {size} bytes ({kind})",
                client=self.id,
                size=len(payload),
                kind="binary" if isBinary else "text",
            )
        hub = self.factory.hub
        try:
            if isBinary:
                hub.publish_binary(self.id, payload)
            elif self.codec is _JSON:
                self._json_request(payload)
            else:
                # Autobahn has validated UTF-8 already (invalid text closes 1007).
                hub.publish_text(self.id, payload.decode("utf-8"))
        except (Forbidden, NotInRoom) as e:
            # A plain client has no error channel: the refusal is logged.
            self._forbidden(str(e), None)

    def _json_request(self, payload: bytes) -> None:
        """
        Carry out one JSON-mode request; refuse bad ones with an ``error``.
        """
        try:
            request = self._parse_request(payload)
            getattr(self, "_do_" + request["type"])(request)
        except BadRequest as e:
            self._refuse(str(e), e.ref)
            if e.kind == "image":
                # Its bytes may follow: discarded, never broadcast.
                self._expect_image(LOBBY, self.factory.limits.max_image_size, e.ref, str(e))
        except (NotInRoom, TooManyRooms) as e:
            self._refuse(str(e), request["ref"])
        except Forbidden as e:
            self._forbidden(str(e), request["ref"])

    def _forbidden(self, reason: str, ref) -> None:
        """
        Refuse what the client's grants do not allow: an ``error`` with the
        request's ``ref``, a warning, never a disconnect.
        """
        self.factory.hub.stats.forbidden += 1
        self._log.warn("[FORBIDDEN] {client}: {reason}", client=self.id, reason=reason)
        if self.codec is _JSON:
            self._reply(_JSON.error(reason, ref))

    def _rate_limited(self, payload: Optional[bytes]) -> None:
        """
        Drop a message sent past the client's rate; a JSON client is told,
        with the message's ``ref`` if it had one, so it knows which to resend.
        """
        limits = self.factory.limits
        self.factory.hub.stats.rate_limited += 1
        if self._rate.abusive:
            self._log.warn(
                "[RATE LIMIT] {client} kept sending past its limit ({rate:g}/s, burst"
                " {burst}); closing with 1008",
                client=self.id,
                rate=limits.rate,
                burst=limits.burst,
            )
            self.close_with(self.CLOSE_STATUS_CODE_POLICY_VIOLATION, "rate limit exceeded")
            return
        if self._rate.dropped_in_a_row == 1:
            # Once per episode, not once per dropped message.
            self._log.warn(
                "[RATE LIMIT] {client} is over {rate:g} messages/s (burst {burst});"
                " dropping its messages",
                client=self.id,
                rate=limits.rate,
                burst=limits.burst,
            )
        if self.codec is _JSON:
            request = self._request_of(payload)
            reason = (
                "rate limit exceeded: at most {:g} messages per second (bursts of {});"
                " message dropped".format(limits.rate, limits.burst)
            )
            if request.get("type") == "image":
                # Its bytes may follow: discarded too, never broadcast.
                size = request.get("size")
                if not isinstance(size, int):
                    size = self.factory.limits.max_image_size
                self._expect_image(LOBBY, size, request.get("ref"), reason)
                self._reply_error("image: " + reason, request.get("ref"))
            else:
                self._reply(_JSON.error(reason, request.get("ref")))

    def _parse_request(self, payload: bytes) -> dict:
        """
        A JSON-mode request, checked against this server's limits.

        :raise BadRequest: if it is not one.
        """
        factory = self.factory
        return parse_client_message(payload, factory.max_name_length, factory.hub.history_size)

    def _request_of(self, payload: Optional[bytes]) -> dict:
        """
        What is known of a JSON request: its ``type`` (if valid) and
        ``ref`` (``None`` if it had no valid one, or it was binary).
        """
        if payload is None:
            return {}
        try:
            return self._parse_request(payload)
        except BadRequest as e:
            return {"type": e.kind, "ref": e.ref}

    # Keepalive (see broadcaster.protocols.keepalive): a peer that vanished without a
    # FIN (dead Wi-Fi, a phone that went to sleep) is only noticed by asking
    # it something.

    def keepalive_ping(self) -> bool:
        if self.state != self.STATE_OPEN:
            return False
        self.sendPing()
        return True

    def onPong(self, payload: bytes) -> None:
        keepalive = self.factory.keepalive
        if keepalive is not None:
            keepalive.pong(self)

    def keepalive_timed_out(self) -> None:
        self._log.info(
            "[DEAD PEER] {client} did not answer a ping within {timeout:g}s; dropping it",
            client=self.id,
            timeout=self.factory.limits.ping_timeout,
        )
        self.wasNotCleanReason = "no answer to a ping (dead peer)"
        self.transport.abortConnection()

    def _refuse(self, reason: str, ref) -> None:
        self.factory.hub.stats.bad_input[self.codec.name] += 1
        self._log.warn("[BAD INPUT] {client}: {reason}", client=self.id, reason=reason)
        self._reply(_JSON.error(reason, ref))

    def _do_message(self, request) -> None:
        ref = request["ref"]
        published = self.factory.hub.publish_text(self.id, request["text"], request["room"])
        if ref is not None:
            published.addCallback(lambda event: self._reply(_JSON.ack(ref, event)))
        published.addErrback(self._backplane_failed, ref)

    def _do_join(self, request) -> None:
        hub = self.factory.hub
        room = request["room"]
        hub.join(self, room)

        def presence(position: Tuple[str, int]):
            epoch, seq = position
            self._reply(
                _JSON.presence(
                    room, self._visible(room), epoch, seq, rights=self.grants.listed(room)
                )
            )
            if request["since"] is not None:
                if not self.grants.allows(room, HISTORY):
                    # In the room, but what it missed is not its to read.
                    return self._forbidden(
                        "not allowed to read the history of room {!r}".format(room),
                        request["ref"],
                    )
                epoch, seq = request["since"]
                return hub.replay(self, room, epoch, seq).addCallback(
                    lambda complete: self._reply(_JSON.recovered(room, complete))
                )

        hub.position(room).addCallback(presence).addErrback(self._backplane_failed, request["ref"])

    def _visible(self, room: str) -> list:
        """
        The members of ``room`` this client may see: all of them with the
        ``presence`` right, else only itself.
        """
        hub = self.factory.hub
        if self.grants.allows(room, PRESENCE):
            return hub.presence(room)
        return hub.seat_of(self, room)

    def _do_leave(self, request) -> None:
        self.factory.hub.leave(self, request["room"])

    def _do_hello(self, request) -> None:
        if self._name_from_auth:
            raise BadRequest(
                "your name is set by the server's sign-in and cannot be changed", request["ref"]
            )
        self.name = request["name"]
        self.factory.hub.rename(self)

    def _do_who(self, request) -> None:
        room = request["room"]
        self.factory.hub.who(self.id, room).addCallback(
            lambda answer: self._reply(
                _JSON.presence(room, *answer, after=request["cursor"], limit=request["limit"])
            )
        ).addErrback(self._backplane_failed, request["ref"])

    def _do_history(self, request) -> None:
        room = request["room"]
        limit = request["limit"]

        def answer(messages) -> None:
            # One more than asked for tells whether older ones are kept.
            more = len(messages) > limit
            self._reply(
                _JSON.history(room, messages[-limit:], more, self.factory.history_reply_size)
            )

        self.factory.hub.history(self.id, room, limit + 1, request["before"]).addCallback(
            answer
        ).addErrback(self._backplane_failed, request["ref"])

    def _do_image_url(self, request) -> None:
        ref = request["ref"]
        fetcher = self.factory.fetcher
        if fetcher is None:
            raise BadRequest("image_url is not enabled on this server", ref)
        # Before anything is downloaded for it.
        self.factory.hub.check(self.id, LOBBY, PUBLISH)
        if self._fetches >= MAX_FETCHES_PER_CLIENT:
            raise BadRequest(
                "at most {} image downloads at once; wait for one to finish".format(
                    MAX_FETCHES_PER_CLIENT
                ),
                ref,
            )
        self._fetches += 1
        host = describe_url(request["url"])
        d = fetcher.fetch_image(request["url"])
        d.addCallbacks(
            self._image_fetched,
            self._image_not_fetched,
            callbackArgs=(host,),
            errbackArgs=(host, ref),
        )

    def _do_image(self, request) -> None:
        """
        An image to share in a room: its bytes are the next message, which
        may be as large as ``--max-image-size`` (others stay within
        ``--max-message-size``).  Refused now, before any byte of it is
        read, if it could not be shared; its bytes, which a client may have
        sent already, are then discarded, never taken for a binary message.
        """
        ref, room, size = request["ref"], request["room"], request["size"]
        refusal = self._image_refusal(room, size)
        self._expect_image(room, size, ref, refusal)
        if refusal is not None:
            self._reply_error("image: " + refusal, ref)

    def _image_refusal(self, room: str, size: int) -> Optional[str]:
        """
        Why an image of ``size`` bytes may not be shared in ``room`` now, or
        ``None``.
        """
        if self.factory.decode is None:
            return "images are not enabled on this server"
        try:
            self.factory.hub.may(self.id, room, PUBLISH)
        except NotInRoom as e:
            return str(e)
        except Forbidden as e:
            self.factory.hub.stats.forbidden += 1
            self._log.warn("[FORBIDDEN] {client}: {reason}", client=self.id, reason=str(e))
            return str(e)
        limit = self.factory.limits.max_image_size
        if size > limit:
            return "an image may be at most {} bytes (--max-image-size), not {}".format(limit, size)
        if self._fetches >= MAX_FETCHES_PER_CLIENT:
            return "at most {} images at once; wait for one to be shared".format(
                MAX_FETCHES_PER_CLIENT
            )
        return None

    def _expect_image(self, room: str, size: int, ref, refusal: Optional[str]) -> None:
        """
        The next message is an image's bytes, which may be up to ``size``
        bytes (within ``--max-image-size``); discarded if ``refusal`` says
        why it may not be shared (the caller tells the client).
        """
        self._upload = (room, size, ref, refusal)
        allow_message_size(self, min(size, self.factory.limits.max_image_size))

    def _reply_error(self, reason: str, ref) -> None:
        if self.state == self.STATE_OPEN:
            self._reply(_JSON.error(reason, ref))

    def _upload_missing(self, upload) -> None:
        """
        A text message came where an announced image's bytes were due: the
        image is given up (the text is then handled as usual).
        """
        room, size, ref, refusal = upload
        if refusal is None:
            self._refuse("image: its bytes must be the next message, a binary one", ref)

    def _uploaded(self, payload: bytes, upload) -> None:
        """
        The bytes of the announced image: decoded off the reactor, checked
        and normalised exactly as an image-port image, then shared.
        """
        room, size, ref, refusal = upload
        if refusal is not None:
            self._log.info(
                "{client}: discarded the {size} bytes of a refused image", client=self.id,
                size=len(payload),
            )
            return
        if len(payload) != size:
            self._refuse("image: announced {} bytes, sent {}".format(size, len(payload)), ref)
            return
        self._fetches += 1
        self.factory.decode(payload).addCallbacks(
            self._image_decoded,
            self._image_not_decoded,
            callbackArgs=(room, ref),
            errbackArgs=(ref,),
        )

    def _image_decoded(self, image: NormalisedImage, room: str, ref) -> None:
        self._fetches -= 1
        if not self._joined:
            return  # gone while it was decoded: nobody to send it from
        hub = self.factory.hub
        try:
            hub.may(self.id, room, PUBLISH)
        except (NotInRoom, Forbidden) as e:
            self._refuse("image: {}".format(e), ref)
            return
        event = self._share(image, room, "uploaded")
        if ref is not None:
            self._reply(_JSON.image_ack(ref, event))

    def _share(self, image: NormalisedImage, room: str, whence: str):
        """
        Publish a normalised image from this client in ``room``, and log it.

        :param whence: how it came (``uploaded``, ``fetched from <host>``).
        """
        event = self.factory.hub.publish_image(
            self.id, image.png, image.width, image.height, room=room
        )
        self._log.info(
            "{client} shared a {width}x{height} {source_format} image in {room}, {whence}"
            " ({size} bytes, {png} as PNG)",
            client=self.id,
            width=image.width,
            height=image.height,
            source_format=image.source_format,
            room=room,
            whence=whence,
            size=image.source_size,
            png=len(image.png),
        )
        return event

    def _image_not_decoded(self, failure: Failure, ref) -> None:
        self._fetches -= 1
        if failure.check(ImageError):
            self.factory.hub.stats.image_decode_errors += 1
            reason = str(failure.value)
            self._log.warn("[IMAGE] {client}: image refused: {reason}", client=self.id, reason=reason)
        else:
            reason = "the server could not read this image"
            self._log.failure("[IMAGE] {client}: decoding failed unexpectedly", failure, client=self.id)
        if self.state == self.STATE_OPEN:
            self._reply(_JSON.error("image: {}".format(reason), ref))

    def _image_fetched(self, image: NormalisedImage, host: str) -> None:
        self._fetches -= 1
        if not self._joined:
            return  # gone while it downloaded: nobody to send it from
        self._share(image, LOBBY, "fetched from {}".format(host))

    def _image_not_fetched(self, failure: Failure, host: str, ref) -> None:
        self._fetches -= 1
        if failure.check(ImageError, FetchError):
            if failure.check(ImageError):
                self.factory.hub.stats.image_decode_errors += 1
            reason = str(failure.value)
            self._log.warn(
                "[IMAGE URL] {client}: image from {host} refused: {reason}",
                client=self.id,
                host=host,
                reason=reason,
            )
        else:
            reason = "the server could not fetch this image"
            self._log.failure(
                "[IMAGE URL] {client}: image from {host} failed unexpectedly",
                failure,
                client=self.id,
                host=host,
            )
        if self.state == self.STATE_OPEN:
            self._reply(_JSON.error("image_url: {}".format(reason), ref))

    # A sign-in by token (see broadcaster.protocols.expiry): warned before
    # its exp, renewed by a refresh, closed without one.

    def token_expiring(self, expires: float, seconds: float) -> None:
        if self.state != self.STATE_OPEN:
            return
        self._log.info(
            "[TOKEN] {client} (user {user!r}): its token expires in {seconds:.0f}s;"
            " asked to refresh it",
            client=self.id,
            user=self.user,
            seconds=seconds,
        )
        self._reply(_JSON.expiring(expires, seconds))

    def token_expired(self) -> None:
        if self.state != self.STATE_OPEN:
            return  # closing already
        self._log.info(
            "[TOKEN EXPIRED] {client} (user {user!r}): its token expired at {expires}"
            " (+{leeway:g}s leeway) and no newer one came; closing with {code}",
            client=self.id,
            user=self.user,
            expires=self._expiry.expires,
            leeway=self.factory.token_leeway,
            code=TOKEN_EXPIRED,
        )
        self.close_with(TOKEN_EXPIRED, "token expired")

    def _do_refresh(self, request) -> None:
        ref = request["ref"]
        if self._expiry is None:
            raise BadRequest("this connection did not sign in with a token", ref)
        if self._refreshing is not None:
            raise BadRequest("a refresh is already under way: wait for its answer", ref)
        # Only a connection signed in with a token gets here, so the
        # authenticator is one that checks tokens.
        d = self.factory.authenticator.verify(request["token"])
        d.addCallbacks(
            self._refreshed, self._not_refreshed, callbackArgs=(ref,), errbackArgs=(ref,)
        )
        # Kept only while it is awaited (a JWKS fetch), to cancel on a close.
        if not d.called:
            self._refreshing = d

    def _refreshed(self, identity: Identity, ref) -> None:
        self._refreshing = None
        if self.state != self.STATE_OPEN:
            return
        if identity.user != self.user:
            return self._refresh_refused("the token is for another user", ref)
        try:
            grants = parse_grants(identity.rooms)
        except ValueError as e:
            return self._refresh_refused("unusable rooms: {}".format(e), ref)
        hub = self.factory.hub
        # Rights may shrink: a room the member may no longer join is left,
        # as a leave request would, rather than kept against its new rights.
        left = hub.regrant(self, grants)
        rights = {room: grants.listed(room) for room in hub.rooms_of(self.id)}
        self._log.info(
            "[TOKEN REFRESHED] {client} (user {user!r}): its token now expires at {expires};"
            " {left} rooms left",
            client=self.id,
            user=self.user,
            expires=identity.expires,
            left=len(left),
        )
        self._reply(_JSON.refreshed(identity.expires, rights, left, ref))
        # After the answer: a token with less than the window left is
        # warned about at once, and that warning follows the answer.
        self._expiry.renew(identity.expires)

    def _not_refreshed(self, failure: Failure, ref) -> None:
        self._refreshing = None
        if self.state != self.STATE_OPEN or failure.check(CancelledError):
            return
        if failure.check(AuthDenied):
            return self._refresh_refused(failure.value.reason or str(failure.value), ref)
        if failure.check(AuthUnavailable):
            return self._refresh_refused(str(failure.value), ref, unavailable=True)
        self._log.failure(
            "[REFRESH FAILED] {client} (user {user!r}): checking the token failed unexpectedly",
            failure,
            client=self.id,
            user=self.user,
        )
        self._reply(_JSON.error(_REFRESH_UNAVAILABLE, ref))

    def _refresh_refused(self, reason: str, ref, unavailable: bool = False) -> None:
        """
        Refuse a ``refresh``: the sign-in in force, and its expiry, stay.
        The client is told why (never the token), or, if the keys to check
        it could not be had (``unavailable``: logged as an error, since the
        client is not at fault), to try again.
        """
        if unavailable:
            log, told = self._log.error, _REFRESH_UNAVAILABLE
        else:
            log, told = self._log.warn, "refresh refused: {}".format(reason)
        log(
            "[REFRESH REFUSED] {client} (user {user!r}): {reason}; its token still"
            " expires at {expires}",
            client=self.id,
            user=self.user,
            reason=reason,
            expires=self._expiry.expires,
        )
        self._reply(_JSON.error(told, ref))

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if not self._joined:
            return
        self._joined = False
        hub = self.factory.hub
        hub.disconnect(self)
        log_disconnect(
            self._log,
            self.id,
            duration=self.factory.clock.seconds() - self._opened_at,
            count=len(hub),
            code=code,
            reason=reason or "",
            clean=wasClean,
        )

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if self.factory.keepalive is not None:
            self.factory.keepalive.remove(self)
        if self._auth is not None:
            # Nobody is waiting for the auth service's answer any more.
            self._auth.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self.ticket is not None:
            self.ticket.release()

    def shut_down(self) -> None:
        """
        The server is stopping: close with 1001 ("going away"), so clients
        know to reconnect rather than treat it as an error.
        """
        self.close_with(self.CLOSE_STATUS_CODE_GOING_AWAY, "server shutting down")

    def abort(self) -> None:
        self.transport.abortConnection()

    def expel(self, reason: str) -> bool:
        """
        The server was told to disconnect this client: close with 4003
        and ``reason``.
        """
        if self.state != self.STATE_OPEN:
            return False
        self._log.info(
            "{client} is disconnected by the server; closing with {code}",
            client=self.id,
            code=DISCONNECTED,
        )
        self.close_with(DISCONNECTED, reason)
        return True

    def deliver(self, event: Event) -> None:
        """
        Send a hub event, framed once per wire format for all recipients.
        """
        if self.state != self.STATE_OPEN:
            # Closing: RFC 6455 allows no data frames after our close frame.
            return
        stats = self.factory.hub.stats
        compressed = self._perMessageCompress is not None
        for prepared in encoded(event, self.codec, _PREPARE[self.codec]):
            if compressed:
                sent = self.send_compressed(prepared.payload, prepared.binary)
            else:
                sent = self._write(prepared.payloadHybi)
            if not sent:
                return  # cut as a slow consumer
            stats.frames_out += 1
            stats.bytes_out += len(prepared.payloadHybi)

    def deliver_many(self, batch) -> None:
        """
        Send a room's events of one reactor turn in one write, whatever the
        state of the connection (:meth:`fan_out` serves the usual case
        faster and hands the others here).
        """
        if self.state != self.STATE_OPEN:
            return
        if self._perMessageCompress is not None:
            # Compressed connections need framing of their own.
            for event in batch:
                self.deliver(event)
            return
        data, frames = encoded(batch, self.codec, _FRAME_BATCH[self.codec])
        if frames and self._write(data):
            stats = self.factory.hub.stats
            stats.frames_out += frames
            stats.bytes_out += len(data)

    #: The hot path of every broadcast: one send() per client of a run, on
    #: Twisted's internals (see broadcaster.protocols.internals).
    fan_out = staticmethod(fan_out)
    #: How fan_out frames a batch for a run of this class.
    frame_batch = staticmethod(_frame_for)

    def _slow_consumer(self, size: int) -> None:
        """
        The client reads more slowly than the chat goes: ``size`` more
        bytes would take it past ``--max-buffer``.  Close it rather than
        hold an ever-growing backlog for it: what waits for it is dropped,
        and the close frame follows the last frame it had begun to receive.
        The broadcast goes on without waiting; the close handshake has
        closeHandshakeTimeout to complete before the connection is dropped.
        """
        factory = self.factory
        cut_slow_consumer(
            self._log, self, self._outbound, size, factory.hub.stats, factory.limits.max_buffer,
            "closing with 4008",
        )
        self.close_with(SLOW_CONSUMER, "slow consumer: too far behind")

    def close_transport(self, abort: bool) -> None:
        """
        Close TCP after what waits in the outbound queue (a close frame,
        say), unless this is an abort.
        """
        outbound = self._outbound
        if abort or outbound is None:
            super().close_transport(abort)
        else:
            outbound.lose_connection()


class BroadcastServerFactory(LeanWebSocketServerFactory):
    """
    Builds :class:`BroadcastServerProtocol` instances that share one hub.

    :ivar debug: whether to log each message received (its size, never its
        content).
    """

    protocol = BroadcastServerProtocol

    #: The :class:`broadcaster.protocols.keepalive.Keepalive` pinging every client,
    #: or ``None`` (``--ping-interval 0``).
    keepalive = None

    def __init__(
        self,
        hub: Hub,
        origin_policy: OriginPolicy,
        clock: IReactorTime,
        limits: Limits = Limits(),
        debug: bool = False,
        max_name_length: int = 32,
        fetcher=None,
        decode=None,
        authenticator: Optional[SignIn] = None,
        anonymous: Grants = EVERYTHING,
        token_refresh_window: float = 60.0,
        token_leeway: float = 30.0,
    ) -> None:
        super().__init__(server="broadcaster/{}".format(__version__), reactor=clock)
        self.hub = hub
        #: What clients that do not sign in may do (--anonymous-rooms).
        self.anonymous = anonymous
        #: An :class:`broadcaster.http.fetch.ImageFetcher` for ``image_url``
        #: requests, or ``None`` (refused).
        self.fetcher = fetcher
        #: Normalises an uploaded image off the reactor (the image port's
        #: decoder: ``decode(bytes)`` -> Deferred of a
        #: :class:`~broadcaster.core.imaging.NormalisedImage`), or ``None``.
        self.decode = decode
        #: Asked about every handshake (``authenticate``, as
        #: :class:`broadcaster.http.auth.Authenticator` and
        #: :class:`broadcaster.http.tokens.TokenAuthenticator` answer it), or ``None``.
        #: One that checks tokens also has ``verify``, for a ``refresh``'s token.
        self.authenticator = authenticator
        #: Seconds before a token's exp its client is sent ``expiring``
        #: (``--token-refresh-window``).
        self.token_refresh_window = token_refresh_window
        #: Seconds after a token's exp its client is closed with 4001
        #: (``--jwt-leeway``, as the handshake allows).
        self.token_leeway = token_leeway
        self.origin_policy = origin_policy
        self.clock = clock
        self.limits = limits
        if limits.ping_interval:
            self.keepalive = Keepalive(clock, limits.ping_interval, limits.ping_timeout)
        self.max_name_length = max_name_length
        #: Bytes of messages one history reply holds: one message of the
        #: largest size always fits.
        self.history_reply_size = max(HISTORY_REPLY_SIZE, limits.max_message_size + 1024)
        #: Told to JSON clients in their welcome, so they can check first.
        self.client_limits = {
            "max_message_size": limits.max_message_size,
            "max_name_length": max_name_length,
            "history_size": hub.history_size,
            "max_rooms_per_client": hub.max_rooms_per_member,
            "rate": limits.rate,
            "burst": limits.burst,
            "members_page": MEMBERS_PAGE,
            "history_reply_size": self.history_reply_size,
            "max_image_size": limits.max_image_size,
        }
        #: Log per-message lines (sizes only).  Checked before formatting an
        #: event at all, since this is on the fan-out's hot path.
        self.debug = debug
        # Autobahn's defaults are unlimited; a public server cannot be.
        self.setProtocolOptions(
            maxFramePayloadSize=limits.max_message_size,
            maxMessagePayloadSize=limits.max_message_size,
            openHandshakeTimeout=limits.open_handshake_timeout,
            closeHandshakeTimeout=5,
            # Tell a misbehaving client why it is being closed (1002, 1007,
            # 1009, ...) instead of just dropping the TCP connection.
            failByDrop=False,
            # Answer a client's close with its own code, as RFC 6455 suggests.
            echoCloseCodeReason=True,
            perMessageCompressionAccept=self._accept_compression,
        )

    _adopted = None

    def adopt(self, ticket):
        """
        The next protocol built takes ``ticket``: the place under the
        connection limits of the HTTP connection it upgrades.

        :return: the ticket given before, if no protocol took it.
        """
        previous, self._adopted = self._adopted, ticket
        return previous

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol.ticket, self._adopted = self._adopted, None
        return protocol

    def _accept_compression(self, offers):
        """
        permessage-deflate only with --compression, and then with the
        decompressed size limited too (a small compressed message must not
        inflate into gigabytes).
        """
        if not self.limits.compression:
            return None
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(
                    offer, max_message_size=self.limits.max_message_size
                )
        return None
