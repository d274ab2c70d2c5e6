"""
The one place broadcaster relies on Twisted's and Autobahn's internals, for
the fan-out's speed and an idle connection's memory; everything else uses
their public APIs.

What is relied on, and why:

- ``twisted.internet.tcp.Server``'s write buffer (``dataBuffer``,
  ``_tempDataLen``, ``_writeDisconnected``, ``TLS``, ``socket``): the
  fan-out's direct path (:func:`fan_out`) sends a batch with one
  ``send()`` on the socket when nothing is queued, instead of three system
  calls through ``transport.write``; :class:`LeanTCPServer`'s ``write``
  does the same for every other write (a handshake's answer, a welcome, a
  reply).
- Autobahn's per-connection state, held in slots instead of an instance
  dict of 90 keys (:data:`AUTOBAHN_STATE`, :data:`FRAME_STATE`,
  :data:`DEFAULTED_STATE`), its handshake record (forgotten once open),
  its ``send_queue`` (never used here), its options (held on a subclass,
  not copied onto each connection: :class:`LeanWebSocketServerFactory`),
  ``onMessageEnd`` (without an observer event per message nobody
  observes), ``sendFrame`` and the permessage-deflate context (to frame
  compressed replies of any size), ``sendCloseFrame`` (for 1001 and 1008)
  and ``_closeConnection`` (to close after what is queued).
- What Autobahn makes for every connection whether or not it is used
  (``WebSocketProtocol.__init__``'s two futures and observer tables,
  ``connectionMade``'s transport details, ``_connectionMade``'s
  ``TrafficStats``, UTF-8 validator and options list): made when first
  needed, shared, or not at all, and the arguments of the debug lines
  Autobahn's adapter makes on every read; the lean protocol's
  ``__init__``, ``connectionMade``, ``dataReceived`` and ``_onOpen``
  stand in for Autobahn's, and
  :func:`check` compares the names Autobahn's use with those they were
  written from (see :class:`LeanWebSocketServerProtocol`).
- ``twisted.internet.tcp.Server``'s per-connection attributes and
  ``tcp.Port.transport``: the listening ports build
  :class:`LeanTCPServer`\ s, which keep those attributes in slots
  (:func:`use_lean_transports`).  Their instance dict did not share its
  keys with the others (832 bytes a connection).
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
import socket
import sys
from collections import deque
from typing import Dict, List, Optional

from pprint import pformat

import autobahn
import autobahn.websocket.protocol as _autobahn_protocol
import twisted
from autobahn.twisted.util import peer2str
from autobahn.twisted.websocket import (
    WebSocketAdapterProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import PerMessageDeflate
from autobahn.websocket.protocol import TrafficStats
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.tcp import Port as _TCPPort, Server as _TCPServer

from broadcaster.protocols.outbound import PIECE

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
    "_transport_details", "_perMessageCompress", "trackedTimings",
    "trafficStats", "state", "send_state", "data", "send_queue", "triggered",
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

#: What Autobahn sets as it reads frames: the first pong answering a
#: keepalive ping would otherwise give every idle connection an instance
#: dict.
FRAME_STATE = (
    "control_frame_data", "current_frame_masker", "_isMessageCompressed", "frame_data",
    "frame_length", "message_data", "message_data_total_length", "message_is_binary",
    "utf8validateIncomingCurrentMessage", "utf8validateLast",
)

#: Per-connection attributes with a default on a Twisted or Autobahn base
#: class: slots too, which ``__init__`` sets to that default (a slot would
#: otherwise hide it, and reading it before it is set would raise).
DEFAULTED_STATE = ("factory", "transport", "connected", "peer")

#: Where ``is_open`` and ``is_closed`` wait to be asked for (see
#: :class:`LeanWebSocketServerProtocol`), and the UTF-8 validator.
LAZY_STATE = ("_is_open", "_is_closed", "_utf8validator", "handshake_at_hand")

class _Opened(Deferred):
    """
    ``is_open`` of a connection that opened with nobody waiting for it: a
    Deferred that has fired with ``None``, which Autobahn's own firing of
    it (as the handshake completes) leaves as it is.
    """

    def __init__(self) -> None:
        super().__init__()
        super().callback(None)

    def callback(self, result) -> None:
        pass


#: Where ``is_open`` is left once open with nobody waiting for it: each
#: reading makes an :class:`_Opened`.
_OPENED = object()

#: The ``TrafficStats`` every connection counts into: Autobahn makes one per
#: connection (176 bytes), and nothing here reads them.
SHARED_TRAFFIC = TrafficStats()

#: ``websocket_extensions_in_use`` of an open connection without extensions.
NO_EXTENSIONS = ()

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

    __slots__ = AUTOBAHN_STATE + FRAME_STATE + DEFAULTED_STATE + LAZY_STATE

    #: The events observers may ask for (``on``), as Autobahn's
    #: ``__init__`` sets them, once for every connection.
    _valid_events = ("message",)

    def __init__(self) -> None:
        # Instead of Autobahn's (WebSocketProtocol.__init__): its futures
        # are made when asked for (is_open, is_closed), its observer tables
        # when an observer is added (on), and its transport details are
        # set by connectionMade.
        for name in DEFAULTED_STATE:
            setattr(self, name, getattr(WebSocketServerProtocol, name))
        self._is_open = self._is_closed = self._utf8validator = None
        self._transport_details = None
        #: Whether the whole opening handshake is handed over with the
        #: connection (see connectionMade).
        self.handshake_at_hand = False

    @property
    def is_open(self) -> Deferred:
        """
        Autobahn's future that fires (with ``None``) once the connection
        is open: made when first asked for (by Autobahn too, to fire it),
        and not kept once open if nobody waits for it.
        """
        opened = self._is_open
        if opened is None:
            opened = self._is_open = Deferred()
        elif opened is _OPENED:
            return _Opened()
        return opened

    @is_open.setter
    def is_open(self, value: Deferred) -> None:
        self._is_open = value

    @property
    def is_closed(self) -> Deferred:
        """
        Autobahn's future that fires (with the protocol) once the
        connection is closed: made when first asked for.
        """
        closed = self._is_closed
        if closed is None:
            closed = self._is_closed = Deferred()
        return closed

    @is_closed.setter
    def is_closed(self, value: Deferred) -> None:
        self._is_closed = value

    def on(self, event, handler) -> None:
        # Autobahn's table of the observers' results, made when the first
        # observer comes rather than for every connection.
        if self._results is None:
            self._results = dict.fromkeys(self._valid_events)
        super().on(event, handler)

    @property
    def utf8validator(self):
        """
        Autobahn's incremental UTF-8 validator (a C object of its own),
        made when the first text message arrives: Autobahn makes one for
        every connection.
        """
        validator = self._utf8validator
        if validator is None:
            validator = self._utf8validator = _autobahn_protocol.Utf8Validator()
        return validator

    @utf8validator.setter
    def utf8validator(self, value) -> None:
        self._utf8validator = value

    def connectionMade(self) -> None:
        """
        Autobahn's (its Twisted adapter's ``connectionMade`` and the
        ``_connectionMade`` methods it calls, checked by :func:`check`),
        without what they make for every connection that a server here
        does not read: transport details (only WAMP reads them; the peer's
        address is kept as ``peer``, as they kept it), a list of all ninety
        options for a debug line, two more debug lines' arguments, a UTF-8
        validator (made with the first text message), traffic counters (a
        shared, empty set) and a send queue.  Making them was a tenth of a
        connection's cost in a connection storm.
        """
        transport = self.transport
        self.peer = peer2str(transport)
        try:
            transport.setTcpNoDelay(self.tcpNoDelay)
        except Exception:
            # Not a TCP socket (a Unix one, say), as Autobahn allows.
            pass
        self._perMessageCompress = None
        self.trackedTimings = None
        self.setTrackTimings(self.trackTimings)
        self.trafficStats = SHARED_TRAFFIC
        self.state = WebSocketServerProtocol.STATE_CONNECTING
        self.send_state = WebSocketServerProtocol.SEND_STATE_GROUND
        self.data = b""
        self.send_queue = NO_SEND_QUEUE
        self.triggered = False
        self._utf8validator = None
        self.wasMaxFramePayloadSizeExceeded = False
        self.wasMaxMessagePayloadSizeExceeded = False
        self.closedByMe = False
        self.failedByMe = False
        self.droppedByMe = False
        self.wasClean = False
        self.wasNotCleanReason = None
        self.wasServerConnectionDropTimeout = False
        self.wasOpenHandshakeTimeout = False
        self.wasCloseHandshakeTimeout = False
        self.wasServingFlashSocketPolicyFile = False
        self.localCloseCode = None
        self.localCloseReason = None
        self.remoteCloseCode = None
        self.remoteCloseReason = None
        self.openHandshakeTimeoutCall = None
        self.closeHandshakeTimeoutCall = None
        self.autoPingTimeoutCall = None
        self.autoPingPending = None
        self.autoPingPendingCall = None
        self.autoPingPendingSeq = 0
        self.autoPingPendingSent = None
        if not self.handshake_at_hand:
            self._start_handshake_timeout()
        self.factory.countConnections += 1

    def _start_handshake_timeout(self) -> None:
        # On the factory's reactor, not Autobahn's batched timer, which
        # rounds deadlines down to the second: a 3 s timeout could end a
        # sign-in still within a 2.5 s --auth-timeout.  (Few connections
        # have one now: see dataReceived.)
        if self.openHandshakeTimeout > 0:
            self.openHandshakeTimeoutCall = self.factory.reactor.callLater(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout
            )

    def dataReceived(self, data: bytes) -> None:
        """
        Autobahn's, without the arguments of a debug line it makes for
        every read (three formatting calls each time, whether or not
        anything logs at debug level).

        A connection whose whole handshake was at hand (an upgrade taken
        over from the HTTP side, :attr:`handshake_at_hand`) gets its open
        handshake timeout only now, if the handshake is still unfinished
        (its sign-in is awaited): the usual handshake finishes in this
        call, and a timer made and cancelled for each was a thirtieth of
        a connection's cost in a connection storm.
        """
        self._dataReceived(data)
        if self.handshake_at_hand:
            self.handshake_at_hand = False
            if self.state == WebSocketServerProtocol.STATE_CONNECTING:
                self._start_handshake_timeout()

    def _onOpen(self) -> None:
        # Autobahn's, less filling in the TLS channel's details in the
        # transport details it no longer makes (connectionMade).
        self.onOpen()

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        if (sync or chopsize) and self.send_queue is NO_SEND_QUEUE:
            self.send_queue = deque()
        super().sendData(data, sync, chopsize)

    def forget_handshake(self) -> None:
        """
        Drop what Autobahn keeps of the opening handshake (request, headers,
        response: about 1.5 KB), which nothing reads once the connection is
        open; the transport details, which only WAMP reads; the list of
        extensions in use if it is empty; and ``is_open``, unless somebody
        asked for it before.
        """
        for name in HANDSHAKE_STATE:
            if hasattr(self, name):
                delattr(self, name)
        self._transport_details = None
        if not self.websocket_extensions_in_use:
            self.websocket_extensions_in_use = NO_EXTENSIONS
        if self._is_open is None:
            # Nobody is waiting for it: Autobahn fires one made when asked.
            self._is_open = _OPENED

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


#: What ``twisted.internet.tcp.Server`` sets on each connection, none of it
#: with a class-level default.
TCP_STATE = (
    "reactor", "_tempDataBuffer", "_tempDataLen", "socket", "protocol", "server", "client",
    "sessionno", "hostname", "repstr",
)

#: What it sets that has a class-level default: slots that
#: :class:`LeanTCPServer` sets to that default first.
TCP_DEFAULTED = (
    "logstr", "connected", "dataBuffer", "offset", "producer", "streamingProducer",
    "producerPaused", "disconnected", "disconnecting", "_writeDisconnecting",
    "_writeDisconnected",
)


#: The largest write :class:`LeanTCPServer` sends at once: the outbound
#: queue's piece.
DIRECT_WRITE = PIECE


class LeanTCPServer(_TCPServer):
    """
    Twisted's TCP server transport, with its per-connection state in
    slots: the instance dicts of its connections did not share their keys
    (832 bytes each, the largest single part of an idle connection).  An
    attribute not named here (a later Twisted's) lands in the instance dict
    as before.
    """

    # fileno is a method of FileDescriptor that Connection.__init__
    # replaces with the socket's before anything reads it.
    __slots__ = TCP_STATE + TCP_DEFAULTED + ("fileno", "_nodelay")

    def __init__(self, *args, **kwargs) -> None:
        for name in TCP_DEFAULTED:
            setattr(self, name, getattr(_TCPServer, name))
        super().__init__(*args, **kwargs)
        # TCP_NODELAY as the socket has it, if known: inherited from a
        # listening socket that has it (use_lean_transports).
        self._nodelay = True if getattr(self.server, "broadcaster_nodelay", False) else None

    def setTcpNoDelay(self, enabled) -> None:
        """
        Twisted's, but not set again to what the socket has already:
        twisted.web's channel and Autobahn each set it on every
        connection, which has it from its listening socket.
        """
        enabled = bool(enabled)
        if self._nodelay is enabled:
            return
        super().setTcpNoDelay(enabled)
        self._nodelay = enabled

    def write(self, data) -> None:
        """
        Twisted's, but with nothing queued the bytes are sent at once, as
        the fan-out's direct path sends them: Twisted would queue them,
        ask the reactor to watch for writability and stop watching once
        they are sent (two more system calls and a turn later; in a
        connection storm a fifteenth of each handshake's cost).  What the
        socket does not take is queued as before, behind nothing.  Only
        for a write of at most :data:`DIRECT_WRITE` bytes, whose unsent
        rest is a copy: a large payload, shared by many clients, is queued
        as it is.
        """
        if (
            data.__class__ is bytes
            and len(data) <= DIRECT_WRITE
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._tempDataLen
            and not self.dataBuffer
            and not self.TLS
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                # Would block, or failed: the write path deals with both.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)


#: The transports the fan-out's direct path knows (a listener made
#: elsewhere, in tests say, builds Twisted's own).
_DIRECT_TRANSPORTS = (LeanTCPServer, _TCPServer)


def use_lean_transports(port) -> None:
    """
    Have the listening ``port`` build :class:`LeanTCPServer` transports,
    if it is one of Twisted's TCP ports (an ``ssl:`` one included, whose
    TLS runs over a TCP transport); any other is left as it is.  On
    Linux its socket gets ``TCP_NODELAY``, which its connections inherit,
    so that twisted.web's and Autobahn's setting it again on each is
    skipped (two system calls a connection; see
    :meth:`LeanTCPServer.setTcpNoDelay`).
    """
    if isinstance(port, _TCPPort) and port.transport is _TCPServer:
        port.transport = LeanTCPServer
        if not sys.platform.startswith("linux"):
            # Elsewhere accepted sockets need not inherit it: each
            # connection sets it, as Twisted and Autobahn do.
            return
        try:
            port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return
        # Linux's accept() copies it onto each connection's socket.
        port.broadcaster_nodelay = True


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
                    and transport.__class__ in _DIRECT_TRANSPORTS
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


#: What Autobahn's connection set-up and open use (their code's names), as
#: :meth:`LeanWebSocketServerProtocol.connectionMade` and ``_onOpen`` do
#: it in their stead: a release that sets up more, or otherwise, is
#: refused by :func:`check`.
_AUTOBAHN_OPENING = {
    _autobahn_protocol.WebSocketProtocol._connectionMade: {
        "CONFIG_ATTRS", "SEND_STATE_GROUND", "STATE_CONNECTING", "STATE_PROXY_CONNECTING",
        "TrafficStats", "Utf8Validator", "WebSocketProtocol", "__class__", "__name__",
        "_batched_timer", "_perMessageCompress", "append", "autoPingPending",
        "autoPingPendingCall", "autoPingPendingSent", "autoPingPendingSeq",
        "autoPingTimeoutCall", "call_later", "closeHandshakeTimeoutCall", "closedByMe", "data",
        "debug", "deque", "droppedByMe", "factory", "failedByMe", "getattr", "hasattr",
        "isServer", "localCloseCode", "localCloseReason", "log", "onOpenHandshakeTimeout",
        "openHandshakeTimeout", "openHandshakeTimeoutCall", "pformat", "proxy",
        "remoteCloseCode", "remoteCloseReason", "send_queue", "send_state",
        "serverConnectionDropTimeoutCall", "setTrackTimings", "setattr", "state",
        "trackTimings", "trackedTimings", "trafficStats", "triggered", "utf8validator",
        "wasClean", "wasCloseHandshakeTimeout", "wasMaxFramePayloadSizeExceeded",
        "wasMaxMessagePayloadSizeExceeded", "wasNotCleanReason", "wasOpenHandshakeTimeout",
        "wasServerConnectionDropTimeout", "wasServingFlashSocketPolicyFile",
    },
    WebSocketServerProtocol._connectionMade: {
        "WebSocketProtocol", "_connectionMade", "countConnections", "debug", "factory",
        "hltype", "log", "peer",
    },
    WebSocketAdapterProtocol.connectionMade: {
        "CHANNEL_FRAMING_WEBSOCKET", "TransportDetails", "_connectionMade",
        "_transport_details", "channel_framing", "connectionMade", "create_transport_details",
        "debug", "hltype", "hlval", "is_server", "log", "peer", "setTcpNoDelay", "tcpNoDelay",
        "transport",
    },
    WebSocketAdapterProtocol.dataReceived: {
        "_dataReceived", "dataReceived", "debug", "hltype", "hlval", "len", "log", "peer",
    },
    WebSocketAdapterProtocol._onOpen: {
        "_transport_details", "channel_id", "extract_peer_certificate", "is_secure",
        "is_server", "onOpen", "peer_cert", "transport", "transport_channel_id",
    },
}

#: The names Autobahn's ``WebSocketProtocol.__init__`` uses, in the version
#: :meth:`LeanWebSocketServerProtocol.__init__` replaces.
_AUTOBAHN_INIT = {
    "TransportDetails", "_transport_details", "create_future", "is_closed", "is_open",
    "set_valid_events", "txaio",
}


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
    for name in TCP_DEFAULTED:
        if not any(name in vars(klass) for klass in _TCPServer.__mro__):
            problems.append("twisted.internet.tcp.Server has no default {}".format(name))
    if getattr(_TCPPort, "transport", None) is not _TCPServer:
        problems.append("twisted.internet.tcp.Port no longer builds its transports from .transport")
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
    # LeanWebSocketServerProtocol.__init__ stands in for this one.
    made = set(_autobahn_protocol.WebSocketProtocol.__init__.__code__.co_names)
    if made != _AUTOBAHN_INIT:
        problems.append(
            "autobahn's WebSocketProtocol.__init__ now sets up {} (not {})".format(
                sorted(made), sorted(_AUTOBAHN_INIT)
            )
        )
    # LeanWebSocketServerProtocol.connectionMade and _onOpen stand in for these.
    for method, names in _AUTOBAHN_OPENING.items():
        made = set(method.__code__.co_names)
        if made != names:
            problems.append(
                "autobahn's {} now uses {} (not {})".format(
                    method.__qualname__, sorted(made), sorted(names)
                )
            )
    for name in ("Utf8Validator", "TrafficStats"):
        if not hasattr(_autobahn_protocol, name):
            problems.append("autobahn.websocket.protocol no longer has {}".format(name))
    for name in ("_valid_events", "_results", "on"):
        if not hasattr(WebSocketServerProtocol, name):
            problems.append("autobahn's WebSocketServerProtocol has no {}".format(name))
    for name in DEFAULTED_STATE:
        if not hasattr(WebSocketServerProtocol, name):
            problems.append("autobahn's WebSocketServerProtocol has no default {}".format(name))
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
