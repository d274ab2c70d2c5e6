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

from typing import List, Optional

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger

from broadcaster import __version__
from broadcaster.hub import Event, Hub, encoded
from broadcaster.members import log_connect, log_disconnect
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
        if JSON_SUBPROTOCOL in request.protocols:
            self.codec = _JSON
            return JSON_SUBPROTOCOL
        return None

    def onOpen(self) -> None:
        hub = self.factory.hub
        self.id = hub.new_id()
        self._opened_at = self.factory.clock.seconds()
        if self.codec is _JSON:
            self.sendMessage(_JSON.welcome(self.id, hub.member_ids() + [self.id]))
        hub.join(self)
        self._joined = True
        log_connect(self._log, self.id, self.peer, self.codec.name, len(hub))

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
            try:
                request = parse_client_message(payload)
            except BadRequest as e:
                self._log.warn(
                    "[BAD INPUT] {client}: {reason}", client=self.id, reason=str(e)
                )
                self.sendMessage(_JSON.error(str(e)))
                return
            hub.publish_text(self.id, request["text"])
        else:
            # Autobahn has validated UTF-8 already (invalid text closes 1007).
            hub.publish_text(self.id, payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if not self._joined:
            return
        self._joined = False
        hub = self.factory.hub
        hub.leave(self)
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
    ) -> None:
        super().__init__(server="broadcaster/{}".format(__version__), reactor=clock)
        self.hub = hub
        self.origin_policy = origin_policy
        self.clock = clock
        self.refused = 0
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
