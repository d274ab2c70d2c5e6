"""
The WebSocket protocol: a thin adapter between Autobahn and the hub.

Wire format (see :mod:`broadcaster.wire` for the events themselves):

- Handshake on ``/`` (query strings such as ``/?name=ann`` allowed).  Offer
  the subprotocol ``broadcaster.json`` for JSON mode; otherwise plain mode.
- A browser handshake whose ``Origin`` is neither the server's own origin nor
  one allowed with ``--allow-origin`` is refused with HTTP 403.  Handshakes
  without ``Origin`` (scripts, devices) are accepted.
- Messages larger than ``--max-message-size`` close the connection with 1009
  (Autobahn enforces it on frames and on reassembled messages).
- JSON mode: input that is not a valid client message gets
  ``{"type": "error", "reason": ...}`` back; the connection stays open.

Logs: every handshake at info (peer, path, Origin, User-Agent), refusals at
warn, connect and disconnect at info (id, close code, reason, duration).
Per-message logs are debug only and never include payloads.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger

from broadcaster import __version__
from broadcaster.hub import Event, Hub, NotInRoom, TooManyRooms, encoded
from broadcaster.members import log_connect, log_disconnect
from broadcaster.names import LOBBY, InvalidName, check_display_name
from broadcaster.origin import OriginPolicy
from broadcaster.wire import (
    JSON_SUBPROTOCOL,
    BadRequest,
    JSONCodec,
    PlainCodec,
    parse_client_message,
)

_PLAIN = PlainCodec()
_JSON = JSONCodec()


def _prepare(codec) -> "callable":
    """
    Build the encoder used by :func:`broadcaster.hub.encoded`: the event in
    ``codec``'s format, framed once as Autobahn prepared messages.
    """

    def prepare(event: Event) -> List[PreparedMessage]:
        return [
            PreparedMessage(payload, is_binary, applyMask=False, doNotCompress=False)
            for payload, is_binary in codec.encode(event)
        ]

    return prepare


_PREPARE = {_PLAIN: _prepare(_PLAIN), _JSON: _prepare(_JSON)}


def _parse_since_param(value: str) -> Optional[Tuple[str, int]]:
    """
    Read ``?since=<epoch>:<seq>``; ``None`` if it is not that.
    """
    epoch, colon, seq = value.rpartition(":")
    if not colon or not epoch or not seq.isdigit():
        return None
    return epoch, int(seq)


class BroadcastServerProtocol(WebSocketServerProtocol):
    """
    One WebSocket client.  It is a hub member between ``onOpen`` and ``onClose``.
    """

    # Autobahn already uses ``self.log``.
    _log = Logger()

    id: Optional[str] = None
    codec = _PLAIN
    _opened_at: float = 0.0
    _joined = False

    name: Optional[str] = None
    _lobby_since: Optional[Tuple[str, int]] = None

    def onConnect(self, request: ConnectionRequest) -> Optional[str]:
        headers = request.headers
        origin = headers.get("origin")
        self._log.info(
            "[HANDSHAKE] {peer} {path} origin={origin} agent={agent!r}",
            peer=request.peer,
            path=request.path,
            origin=origin if origin is not None else "-",
            agent=headers.get("user-agent", "-"),
        )
        secure = ISSLTransport.providedBy(self.transport)
        if not self.factory.origin_policy.permits(origin, headers.get("host"), secure):
            self._log.warn(
                "[REFUSED] {peer}: Origin {origin} is not this server's origin"
                " (Host {host}) nor allowed by --allow-origin; answered 403",
                peer=request.peer,
                origin=origin,
                host=headers.get("host", "-"),
            )
            self.factory.refused += 1
            raise ConnectionDeny(
                ConnectionDeny.FORBIDDEN,
                "Origin {} is not allowed to connect to this server".format(origin),
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
                self.factory.refused += 1
                raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "?name=: {}".format(e))
        self._lobby_since = None
        since = request.params.get("since")
        if since:
            self._lobby_since = _parse_since_param(since[-1])
            if self._lobby_since is None:
                self._log.warn(
                    "[REFUSED] {peer}: bad ?since= {since!r}; answered 400",
                    peer=request.peer,
                    since=since[-1],
                )
                self.factory.refused += 1
                raise ConnectionDeny(
                    ConnectionDeny.BAD_REQUEST,
                    "?since= must be <epoch>:<seq> from the last lobby message seen",
                )
        if JSON_SUBPROTOCOL in request.protocols:
            self.codec = _JSON
            return JSON_SUBPROTOCOL
        return None

    def onOpen(self) -> None:
        factory = self.factory
        hub = factory.hub
        self.id = hub.new_id()
        self._opened_at = factory.clock.seconds()
        if self.codec is _JSON:
            history = hub.histories.get(LOBBY)
            self.sendMessage(
                _JSON.welcome(
                    self,
                    hub.room_members(LOBBY) + [self],
                    history.epoch,
                    history.seq,
                    factory.limits,
                )
            )
        hub.connect(self)
        self._joined = True
        log_connect(self._log, self.id, self.peer, self.codec.name, len(hub))
        if self._lobby_since is not None and self.codec is _JSON:
            # Recovery of the lobby asked for in the URL: replayed in the
            # same turn as the connect, so before any live message.
            epoch, seq = self._lobby_since
            self.sendMessage(_JSON.recovered(LOBBY, hub.replay(self, LOBBY, epoch, seq)))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.factory.debug:
            self._log.debug(
                "{client} sent {size} bytes ({kind})",
                client=self.id,
                size=len(payload),
                kind="binary" if isBinary else "text",
            )
        hub = self.factory.hub
        if isBinary:
            hub.publish_binary(self.id, payload)
        elif self.codec is _JSON:
            self._json_request(payload)
        else:
            # Autobahn has validated UTF-8 already (invalid text closes 1007).
            hub.publish_text(self.id, payload.decode("utf-8"))

    def _json_request(self, payload: bytes) -> None:
        """
        Carry out one JSON-mode request; refuse bad ones with an ``error``.
        """
        factory = self.factory
        try:
            request = parse_client_message(
                payload, factory.max_name_length, factory.hub.histories.size
            )
            getattr(self, "_do_" + request["type"])(request)
        except BadRequest as e:
            self._refuse(str(e), e.ref)
        except (NotInRoom, TooManyRooms) as e:
            self._refuse(str(e), request["ref"])

    def _refuse(self, reason: str, ref) -> None:
        self._log.warn("[BAD INPUT] {client}: {reason}", client=self.id, reason=reason)
        self.sendMessage(_JSON.error(reason, ref))

    def _do_message(self, request) -> None:
        event = self.factory.hub.publish_text(self.id, request["text"], request["room"])
        if request["ref"] is not None:
            self.sendMessage(_JSON.ack(request["ref"], event))

    def _do_join(self, request) -> None:
        hub = self.factory.hub
        room = request["room"]
        hub.join(self, room)
        history = hub.histories.get(room)
        self.sendMessage(_JSON.presence(room, hub.room_members(room), history.epoch, history.seq))
        if request["since"] is not None:
            epoch, seq = request["since"]
            complete = hub.replay(self, room, epoch, seq)
            self.sendMessage(_JSON.recovered(room, complete))

    def _do_leave(self, request) -> None:
        self.factory.hub.leave(self, request["room"])

    def _do_hello(self, request) -> None:
        self.name = request["name"]
        self.factory.hub.rename(self)

    def _do_who(self, request) -> None:
        hub = self.factory.hub
        room = request["room"]
        # Asking costs nothing: no history is created for a room nobody used.
        history = hub.histories.peek(room)
        self.sendMessage(
            _JSON.presence(
                room,
                hub.room_members(room),
                history.epoch if history else None,
                history.seq if history else 0,
            )
        )

    def _do_history(self, request) -> None:
        room = request["room"]
        messages = self.factory.hub.history(self.id, room, request["limit"])
        self.sendMessage(_JSON.history(room, messages))

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
        # Autobahn cancels its close-handshake timer only when the peer's
        # close frame arrives; a peer that drops the TCP connection instead
        # would leave it pending for closeHandshakeTimeout seconds per
        # connection.  Nothing is left to time out once the connection is gone.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None

    def shut_down(self) -> None:
        """
        The server is stopping: close with 1001 ("going away"), so clients
        know to reconnect rather than treat it as an error.
        """
        # sendClose() only takes the codes an application may send (1000,
        # 3000-4999); 1001 is the server's own to send, so frame it directly.
        self.sendCloseFrame(
            code=self.CLOSE_STATUS_CODE_GOING_AWAY,
            reasonUtf8=b"server shutting down",
            isReply=False,
        )

    def abort(self) -> None:
        self.transport.abortConnection()

    def deliver(self, event: Event) -> None:
        """
        Send a hub event, framed once per wire format for all recipients.
        """
        if self.state != self.STATE_OPEN:
            # Closing: RFC 6455 allows no data frames after our close frame.
            return
        for prepared in encoded(event, self.codec, _PREPARE[self.codec]):
            self.sendPreparedMessage(prepared)


class BroadcastServerFactory(WebSocketServerFactory):
    """
    Builds :class:`BroadcastServerProtocol` instances that share one hub.

    :ivar refused: handshakes refused by the Origin policy, for /healthz.
    :ivar debug: whether to log each message received (its size, never its
        content).
    """

    protocol = BroadcastServerProtocol

    def __init__(
        self,
        hub: Hub,
        origin_policy: OriginPolicy,
        clock: IReactorTime,
        max_message_size: int = 64 * 1024,
        open_handshake_timeout: float = 10.0,
        debug: bool = False,
        max_name_length: int = 32,
    ) -> None:
        super().__init__(server="broadcaster/{}".format(__version__), reactor=clock)
        self.hub = hub
        self.origin_policy = origin_policy
        self.clock = clock
        self.refused = 0
        self.max_name_length = max_name_length
        #: Told to JSON clients in their welcome, so they can check first.
        self.limits = {
            "max_message_size": max_message_size,
            "max_name_length": max_name_length,
            "history_size": hub.histories.size,
            "max_rooms_per_client": hub.max_rooms_per_member,
        }
        #: Log per-message lines (sizes only).  Checked before formatting an
        #: event at all, since this is on the fan-out's hot path.
        self.debug = debug
        # Autobahn's defaults are unlimited; a public server cannot be.
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            openHandshakeTimeout=open_handshake_timeout,
            closeHandshakeTimeout=5,
            # Tell a misbehaving client why it is being closed (1002, 1007,
            # 1009, ...) instead of just dropping the TCP connection.
            failByDrop=False,
            perMessageCompressionAccept=lambda offers: None,
        )
