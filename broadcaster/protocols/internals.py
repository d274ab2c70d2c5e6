"""
The one place broadcaster relies on Twisted's and Autobahn's internals, for
the fan-out's speed and an idle connection's memory; everything else uses
their public APIs.

What is relied on, and why:

- ``twisted.internet.tcp.Server``'s write buffer (``dataBuffer``,
  ``_tempDataLen``, ``_writeDisconnected``, ``TLS``, ``socket``): the
  fan-out's direct path (:func:`fan_out`) sends a batch with one
  ``send()`` on the socket when nothing is queued, instead of three system
  calls through ``transport.write``.
- Autobahn's per-connection state, held in slots instead of an instance
  dict of 90 keys (:data:`AUTOBAHN_STATE`), its handshake record
  (forgotten once open), its ``send_queue`` (never used here), its options
  (held on a subclass, not copied onto each connection:
  :class:`LeanWebSocketServerFactory`), ``onMessageEnd`` (without an
  observer event per message nobody observes), ``sendFrame`` and the
  permessage-deflate context (to frame compressed replies of any size),
  ``sendCloseFrame`` (for 1001 and 1008) and ``_closeConnection`` (to
  close after what is queued).
- ``autobahn.websocket.protocol.pformat``: Autobahn pretty-prints its
  ninety options for a debug log line on every connection, whether or not
  anything logs at debug level (0.7 ms per connection, most of what
  opening one cost: ``python -m bench --scenarios S3``).  The name is
  rebound to :class:`LazyFormat`, which pretty-prints only if the line is
  ever formatted.
- The size limits Autobahn reads from the protocol on every frame
  (``maxFramePayloadSize``, ``maxMessagePayloadSize``) and the
  permessage-deflate context's ``max_message_size``: raised for the one
  message that carries an image a client announced
  (:func:`allow_message_size`).

:func:`check` verifies each of these on the installed versions.  It runs
when this module is imported, so a release that changes them stops the
server at start-up with a message naming what changed, rather than making
it silently slower or wrong; ``tests/protocols/test_internals.py`` runs it, and
checks the behaviour the direct path depends on with real sockets.
setup.cfg pins the major versions this was tested with.
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Dict, List, Optional

from pprint import pformat

import autobahn
import autobahn.websocket.protocol as _autobahn_protocol
import twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflate
from twisted.internet.abstract import FileDescriptor
from twisted.internet.tcp import Server as _TCPServer

#: The versions this module was written and tested against: ``(first,
#: last)`` major versions, inclusive (setup.cfg has the same bounds).
TESTED = {"twisted": (23, 26), "autobahn": (23, 26)}


class InternalsChanged(ImportError):
    """
    A Twisted or Autobahn release no longer has an internal this module
    relies on.
    """


#: The opening handshake's request and response, kept by Autobahn for its
#: own test suite: dropped once the connection is open
#: (:meth:`LeanWebSocketServerProtocol.forget_handshake`).
HANDSHAKE_STATE = (
    "http_request_data", "http_status_line", "http_headers", "http_request_uri",
    "http_request_path", "http_request_params", "http_request_host", "websocket_protocols",
    "websocket_origin", "websocket_extensions", "_wskey", "http_response_data",
)

#: What Autobahn sets on every connection, in ``_connectionMade`` and the
#: opening handshake, none of it with a class-level default.  As slots they
#: cost 8 bytes each; as instance attributes, with the options Autobahn
#: also copies onto each connection, they made an instance dict of over 90
#: keys (3.3 KB, too many for Python's key-sharing dicts).  A name Autobahn
#: stops using is merely an unused slot; one it adds lands in the instance
#: dict as before.
AUTOBAHN_STATE = HANDSHAKE_STATE + (
    "is_closed", "is_open", "_transport_details", "_perMessageCompress", "trackedTimings",
    "trafficStats", "state", "send_state", "data", "send_queue", "triggered", "utf8validator",
    "wasMaxFramePayloadSizeExceeded", "wasMaxMessagePayloadSizeExceeded", "closedByMe",
    "failedByMe", "droppedByMe", "wasClean", "wasNotCleanReason",
    "wasServerConnectionDropTimeout", "wasOpenHandshakeTimeout", "wasCloseHandshakeTimeout",
    "wasServingFlashSocketPolicyFile", "localCloseCode", "localCloseReason",
    "remoteCloseCode", "remoteCloseReason", "openHandshakeTimeoutCall",
    "closeHandshakeTimeoutCall", "autoPingTimeoutCall", "autoPingPending",
    "autoPingPendingCall", "autoPingPendingSeq", "autoPingPendingSent", "inside_message",
    "current_frame", "websocket_version", "websocket_protocol_in_use",
    "websocket_extensions_in_use",
)

#: ``send_queue`` until a chopped or synchronous write needs a real queue
#: (we make none): Autobahn only ever takes its length then, and an empty
#: deque per connection is 624 bytes.
NO_SEND_QUEUE = ()


class LeanWebSocketServerProtocol(WebSocketServerProtocol):
    """
    Autobahn's server protocol, with its state in slots and without what
    a broadcast server does not use; the internals it touches are checked
    by :func:`check`.
    """

    __slots__ = AUTOBAHN_STATE

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send_queue = NO_SEND_QUEUE

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        if (sync or chopsize) and self.send_queue is NO_SEND_QUEUE:
            self.send_queue = deque()
        super().sendData(data, sync, chopsize)

    def forget_handshake(self) -> None:
        """
        Drop what Autobahn keeps of the opening handshake (request, headers,
        response: about 1.5 KB), which nothing reads once the connection is
        open; and the transport details, which only WAMP reads.
        """
        for name in HANDSHAKE_STATE:
            if hasattr(self, name):
                delattr(self, name)
        self._transport_details = None

    def onMessageEnd(self) -> None:
        """
        Autobahn's, less the ``message`` observer event when nothing
        observes it (nothing here does): firing it anyway builds a Deferred
        and its callbacks for every message a client sends.
        """
        if self._listeners or self._parent is not None:
            return super().onMessageEnd()
        if not self.failedByMe:
            if self.trackedTimings:
                self.trackedTimings.track("onMessage")
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def send_compressed(self, payload: bytes, is_binary: bool) -> bool:
        """
        Compress and frame one message for this client alone (a
        permessage-deflate context is per connection), without Autobahn's
        ``sendMessage``, which refuses to send anything larger than the
        limit on what clients may send.

        :return: whether the connection is still open.
        """
        compressor = self._perMessageCompress
        compressor.start_compress_message()
        data = compressor.compress_message_data(payload) + compressor.end_compress_message()
        self.sendFrame(opcode=2 if is_binary else 1, payload=data, rsv=4)
        return self.state == self.STATE_OPEN

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with any code, 1001 and 1008 included
        (Autobahn's ``sendClose()`` only takes 1000 and 3000-4999).
        """
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def close_transport(self, abort: bool) -> None:
        """
        Close TCP once the WebSocket is closed (Autobahn's last step):
        subclasses may wait for what they have queued first.
        """
        super()._closeConnection(abort)

    def _closeConnection(self, abort: bool = False) -> None:
        self.close_transport(abort)

    def dropConnection(self, abort: bool = False) -> None:
        """
        Close TCP gracefully once a WebSocket was open.

        Autobahn aborts (TCP reset) when a close frame arrives while it is
        closing, even when that close frame is invalid and Autobahn has just
        queued its own 1002/1007 answer: the reset throws that answer away,
        and turns the peer's proper close reply into a reset too (RFC 6455
        wants a clean TCP close).  After a completed handshake, flush and
        FIN instead; closeHandshakeTimeout still bounds a peer that never
        closes.
        """
        if abort and self.wasClean:
            abort = False
        super().dropConnection(abort)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        # Autobahn cancels its close-handshake timer only when the peer's
        # close frame arrives; a peer that drops the TCP connection instead
        # would leave it pending for closeHandshakeTimeout seconds per
        # connection.  Nothing is left to time out once the connection is gone.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None


def allow_message_size(protocol, size: Optional[int]) -> None:
    """
    Let ``protocol``'s client send its next message with up to ``size``
    bytes (an image it announced, larger than ``--max-message-size``), or
    (``None``) hold it to the factory's limits again.

    Autobahn checks each frame's header against the protocol's
    ``maxFramePayloadSize`` and ``maxMessagePayloadSize`` before reading
    its payload, and the permessage-deflate context checks what it
    inflates against its own ``max_message_size``: all three move
    together, for this connection only (the options stay on the class).
    """
    compressor = protocol._perMessageCompress
    if size is None:
        for name in ("maxFramePayloadSize", "maxMessagePayloadSize"):
            protocol.__dict__.pop(name, None)
        if compressor is not None:
            compressor.max_message_size = protocol.maxMessagePayloadSize
        return
    limit = max(size, type(protocol).maxMessagePayloadSize)
    protocol.maxFramePayloadSize = protocol.maxMessagePayloadSize = limit
    if compressor is not None:
        compressor.max_message_size = limit


class LeanWebSocketServerFactory(WebSocketServerFactory):
    """
    Autobahn's factory, with the protocol's options held once on a class
    rather than copied onto every connection.
    """

    def setProtocolOptions(self, **options) -> None:
        """
        Set Autobahn's options, and make :attr:`protocol` a subclass of the
        class's own holding them as class attributes.

        Autobahn copies every option (29 of them) onto each connection
        unless its class already has them; on the class they are stored
        once.  A new subclass per call keeps Autobahn's semantics: a
        connection keeps the options it was made with.
        """
        super().setProtocolOptions(**options)
        base = type(self).protocol
        # The subclass keeps its base's module: log namespaces (the logger
        # names the class of the instance) stay the protocol's own.
        namespace = {"__slots__": (), "__module__": base.__module__}
        for name in base.CONFIG_ATTRS:
            value = getattr(self, name)
            # A function as a class attribute would become a method.
            namespace[name] = staticmethod(value) if callable(value) else value
        self.protocol = type(base.__name__, (base,), namespace)


def fan_out(engine, batch, members: List, index: int, occupants: Dict, deadline) -> int:
    """
    The WebSocket protocol's ``fan_out`` (see
    :class:`broadcaster.core.members.Member`), the hot path of every
    broadcast: send ``batch`` to the run of connections of one class that
    starts at ``members[index]``.

    A round to a thousand clients is a thousand of these visits, and on
    loopback one ``send()`` costs 5 to 10 µs of kernel time, so each
    microsecond of Python per visit lengthens the round, and the latency
    of the last client, by a millisecond.  So the usual case (an open,
    uncompressed plain TCP connection with nothing queued and a client
    keeping up) takes one ``send()`` on the socket and no calls:
    ``transport.write`` would only queue the bytes, register the socket
    for writing (a system call), send them on the reactor's next turn
    (another) and unregister it (a third).  Whatever the socket does not
    take at once waits in the client's outbound queue (shared, not
    copied), after nothing (nothing was queued), so order, flow control
    and error handling stay the transport's.  Everything else takes the
    member's ``deliver_many``.

    The class provides ``frame_batch(batch, codec)``: the bytes of one
    write holding ``batch`` in ``codec``'s format and how many frames they
    are, called once per wire format per run.  (A plain function, not a
    closure over the framing: measured, a closure made every visit about 6%
    slower in the benchmark's S1.)

    :return: the index of the first member not served: one of another
        class, or the next one when ``deadline`` passed.
    """
    kind = members[index].__class__
    OPEN = kind.STATE_OPEN
    member_in_room = occupants.get
    timer = engine.timer
    check = engine.SLICE_CHECK
    frames_out = bytes_out = 0
    codec = None
    count = len(members)
    while index < count:
        member = members[index]
        if member.__class__ is not kind:
            break
        index += 1
        # Gone from the room since (a leave, or a failed delivery).
        if member_in_room(member.id) is member:
            try:
                transport = member.transport
                if (
                    member.state == OPEN
                    and member._perMessageCompress is None
                    and not member._outbound.paused
                    and transport.__class__ is _TCPServer
                    and not transport.TLS
                    and transport.connected
                    and not transport.disconnecting
                    and not transport._writeDisconnected
                    and not transport._tempDataLen
                    and not transport.dataBuffer
                ):
                    if member.codec is not codec:
                        # Framed once per wire format.
                        data, frames = kind.frame_batch(batch, member.codec)
                        size = len(data)
                        codec = member.codec
                    if frames:
                        try:
                            sent = transport.socket.send(data)
                        except OSError:
                            # Would block, or failed: the transport's own
                            # write path deals with both.
                            sent = 0
                        if sent != size:
                            # The rest waits in the client's outbound
                            # queue, shared with the others, not copied.
                            member._outbound.write(memoryview(data)[sent:], 0)
                        frames_out += frames
                        bytes_out += size
                else:
                    member.deliver_many(batch)
            except Exception:
                engine.delivery_failed(member, batch)
        if deadline is not None and not index % check and timer() > deadline:
            break
    stats = engine.stats
    stats.frames_out += frames_out
    stats.bytes_out += bytes_out
    return index


class LazyFormat:
    """
    ``pformat(value)``, computed when (and if) it is shown.
    """

    __slots__ = ("_value",)

    def __init__(self, value) -> None:
        self._value = value

    def __str__(self) -> str:
        return pformat(self._value)

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


def check() -> None:
    """
    Verify that the installed Twisted and Autobahn have every internal this
    module relies on.

    :raise InternalsChanged: naming what is missing or changed.
    """
    problems: List[str] = []
    for name, module in (("twisted", twisted), ("autobahn", autobahn)):
        first, last = TESTED[name]
        major = _major(module.__version__)
        if not first <= major <= last:
            problems.append(
                "{} {} is outside the tested majors {}-{}".format(
                    name, module.__version__, first, last
                )
            )
    # The direct path reads these on every visit.
    for name in ("dataBuffer", "_writeDisconnected", "TLS", "disconnecting", "connected"):
        if not hasattr(_TCPServer, name):
            problems.append("twisted.internet.tcp.Server has no class attribute {}".format(name))
    # An instance attribute, set in __init__: read from its code, not its
    # source file (which an installation need not carry).
    if "_tempDataLen" not in FileDescriptor.__init__.__code__.co_names:
        problems.append("twisted's FileDescriptor no longer keeps _tempDataLen")
    for name in ("CONFIG_ATTRS", "_onMessage", "sendFrame", "sendCloseFrame", "_closeConnection",
                 "dropConnection", "onMessageEnd", "sendData", "_listeners", "_parent"):
        if not hasattr(WebSocketServerProtocol, name):
            problems.append("autobahn's WebSocketServerProtocol has no {}".format(name))
    parameters = inspect.signature(WebSocketServerProtocol.sendFrame).parameters
    for name in ("opcode", "payload", "rsv"):
        if name not in parameters:
            problems.append("autobahn's sendFrame takes no {!r}".format(name))
    for name in ("start_compress_message", "compress_message_data", "end_compress_message"):
        if not hasattr(PerMessageDeflate, name):
            problems.append("autobahn's PerMessageDeflate has no {}".format(name))
    if "max_message_size" not in PerMessageDeflate.__init__.__code__.co_names:
        problems.append("autobahn's PerMessageDeflate no longer keeps max_message_size")
    for name in ("maxFramePayloadSize", "maxMessagePayloadSize"):
        if name not in getattr(WebSocketServerProtocol, "CONFIG_ATTRS", ()):
            problems.append("autobahn no longer reads the option {}".format(name))
    if getattr(_autobahn_protocol, "pformat", None) not in (pformat, LazyFormat):
        problems.append("autobahn.websocket.protocol no longer uses pprint's pformat")
    if problems:
        raise InternalsChanged(
            "broadcaster relies on internals that this Twisted/Autobahn no longer have"
            " (see broadcaster/protocols/internals.py): " + "; ".join(problems)
        )


check()
# Only once its internals are known to be there.
_autobahn_protocol.pformat = LazyFormat
