"""
A one-way stream of rooms for dashboards, scripts and ``curl -N``:
``GET /events?room=lobby&room=dev`` answers ``text/event-stream``
(Server-Sent Events, as browsers' ``EventSource`` reads them).

Wire format, one event per blank-line-terminated block::

    retry: 2000
    id: 9b1e0c55a2d4:41
    event: welcome
    data: {"id":"3f9a1c-9","user":null,"rooms":{"lobby":{"epoch":"9b1e0c55a2d4","seq":41,"rights":[...]}}}

    id: 9b1e0c55a2d4:42
    data: {"type":"message","room":"lobby","from":"3f9a1c-5","name":"ann","text":"hi",...}

    event: join
    data: {"type":"join","room":"lobby","id":"3f9a1c-7","name":"bob","ts":...}

    : ping

Messages are unnamed events (``EventSource.onmessage`` gets them), with
the JSON protocol's ``message`` object as data; joins, leaves, renames,
binary messages and images (their header: the bytes are not sent) are
named after their ``type``; ``recovered`` ends a replay.  A comment
(``: ping``) goes out every ``--ping-interval`` seconds so that proxies
keep the stream open.

*Recovery.*  Each message's ``id`` is where the stream stands: with one
room ``<epoch>:<seq>``, with several ``<room>=<epoch>:<seq>`` for each,
comma-separated (room names hold no ``,`` ``=`` or ``:``).  A browser's
``EventSource`` sends the last one back as ``Last-Event-ID`` when it
reconnects (``curl -H 'Last-Event-ID: ...'`` does the same): every room
named in it is replayed from there, exactly as a WebSocket client's
``since``, then ``recovered`` says whether that was complete.

The stream is a hub member like any other connection: admitted under the
same limits (it is an HTTP connection of the main port), signed in and
checked by the same policy (:mod:`broadcaster.protocols.gate`), kept to
its rights, and written through its own
:class:`~broadcaster.protocols.outbound.Outbound`: a reader that falls
``--max-buffer`` behind is cut off.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.logger import Logger

from broadcaster.core.events import Event, TextMessage, encoded
from broadcaster.core.members import MemberBase
from broadcaster.core.names import LOBBY, InvalidName, check_room
from broadcaster.core.permissions import HISTORY
from broadcaster.protocols.connection import cut_slow_consumer, log_connect, log_disconnect
from broadcaster.protocols.expiry import TokenExpiry
from broadcaster.protocols.outbound import Outbound
from broadcaster.protocols.wire import event_json, parse_since_param

#: The content type of the stream.
CONTENT_TYPE = b"text/event-stream; charset=utf-8"

#: Milliseconds a browser waits before reconnecting a dropped stream.
RETRY_MS = 2000

#: The longest position of one room in an id, in characters: a room name
#: (64), ``=``, an epoch (a 12-character one of Redis, or a longer local
#: one), ``:`` and a sequence number, with room to spare.
MAX_POSITION = 160

_PING = b": ping\n\n"

Position = Tuple[str, int]


class StreamRequestError(ValueError):
    """
    A ``GET /events`` that cannot be served as asked (answered 400).
    """


def parse_stream_request(
    rooms: Sequence[str], last_event_id: Optional[str], max_rooms: int
) -> Tuple[List[str], Dict[str, Position]]:
    """
    Check what a stream asks for.

    :param rooms: the ``room`` parameters (none: the lobby).
    :param last_event_id: the ``Last-Event-ID`` header, if any.
    :return: the rooms, each once, and where to replay each from.
    :raise StreamRequestError: with what was wrong.
    """
    wanted: Dict[str, None] = {}
    for room in rooms or [LOBBY]:
        try:
            wanted[check_room(room)] = None
        except InvalidName as e:
            raise StreamRequestError("?room=: {}".format(e)) from None
    if len(wanted) > max_rooms:
        raise StreamRequestError(
            "at most {} rooms per stream (--max-rooms-per-client)".format(max_rooms)
        )
    since: Dict[str, Position] = {}
    if last_event_id:
        # The ids this server writes for as many rooms as a stream may have.
        if len(last_event_id) > MAX_POSITION * max_rooms:
            raise StreamRequestError("Last-Event-ID is too long")
        for part in last_event_id.split(","):
            room, separator, position = part.strip().rpartition("=")
            if not separator:
                if len(wanted) != 1 or "," in last_event_id:
                    raise StreamRequestError(
                        "Last-Event-ID must name each room (<room>=<epoch>:<seq>,...)"
                        " for a stream of several rooms"
                    )
                room = next(iter(wanted))
            parsed = parse_since_param(position)
            if parsed is None:
                raise StreamRequestError(
                    "Last-Event-ID must be the id of an event of this stream"
                    " (<epoch>:<seq>, or <room>=<epoch>:<seq>,...)"
                )
            if room in wanted:
                since[room] = parsed
    return list(wanted), since


def stream_id(positions: Mapping[str, Position]) -> str:
    """
    The ``id`` of an event: where the stream stands in each of its rooms.
    """
    if len(positions) == 1:
        ((epoch, seq),) = positions.values()
        return "{}:{}".format(epoch, seq)
    return ",".join("{}={}:{}".format(room, *position) for room, position in positions.items())


def sse_event(name: Optional[str], data: Dict[str, Any], event_id: Optional[str] = None) -> bytes:
    """
    One event of the stream.  Compact JSON has no line breaks (they are
    escaped in its strings), so ``data`` is one line.
    """
    lines = []
    if event_id is not None:
        lines.append("id: " + event_id)
    if name is not None:
        lines.append("event: " + name)
    lines.append("data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _encode(event: Event) -> bytes:
    """
    An event as the stream sends it, without its ``id`` (which is the
    stream's own): messages unnamed, the rest named after their ``type``.
    """
    obj = event_json(event)
    if obj is None:
        return b""
    return sse_event(None if isinstance(event, TextMessage) else obj["type"], obj)


class _SSE:
    """The key of the stream's encodings in an event's cache."""


def chunk(pieces: List[bytes]) -> List[bytes]:
    """
    ``pieces`` as one HTTP/1.1 chunk (RFC 9112 7.1): the stream's body has
    no length.
    """
    size = sum(len(piece) for piece in pieces)
    return [b"%x\r\n" % size, *pieces, b"\r\n"]


class StreamBody:
    """
    The body of a response that lasts as long as its reader stays (an
    event stream), written past twisted.web straight to the connection
    through an :class:`~broadcaster.protocols.outbound.Outbound` of its own,
    so that ``--max-buffer`` bounds what waits for a slow reader.

    Made once the stream is sure to start: it answers 200 with the
    stream's headers, at once.
    """

    def __init__(self, request) -> None:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        request.setHeader(b"Cache-Control", b"no-store")
        # Proxies that buffer responses (nginx) would hold events back.
        request.setHeader(b"X-Accel-Buffering", b"no")
        # A stream ends with the connection: no other request follows it.
        request.setHeader(b"Connection", b"close")
        # The headers, now: the body has no length, so HTTP/1.1 chunks it.
        request.write(b"")
        self._chunked = bool(request.chunked)
        #: The connection's one outbound path.
        self.outbound = Outbound(request.channel.transport)

    def write(self, pieces: List[bytes], limit: int) -> bool:
        """
        Queue ``pieces`` (whole events) for the reader.

        :param limit: the bytes that may wait for it.
        :return: ``False`` if it is too far behind (nothing was queued):
            the caller cuts it off.
        """
        if self._chunked:
            pieces = chunk(pieces)
        return self.outbound.write_sequence(pieces, limit)

    def end(self, limit: int) -> bool:
        """
        End the body (a chunked one with its last chunk, an empty one),
        then close the connection once all of it is sent.

        :return: ``False`` if the reader is too far behind even for that
            (nothing was done): the caller cuts it off.
        """
        if self._chunked and not self.write([], limit):
            return False
        self.outbound.lose_connection()
        return True


class EventStream(MemberBase):
    """
    One ``GET /events`` response: a hub member until the client goes.

    :param factory: the WebSocket factory, for the hub, the limits, the
        clock and the keepalive every connection of the main port shares.
    :param request: the twisted.web request, its headers already written.
    :param rooms: what it streams.
    :param since: rooms to replay from a position (``Last-Event-ID``).
    """

    _log = Logger()
    kind = "sse"
    closing = False

    def __init__(
        self,
        factory,
        request,
        rooms: List[str],
        since: Dict[str, Position],
        grants,
        user: Optional[str],
        name: Optional[str],
        peer: str,
        expires: Optional[float] = None,
    ) -> None:
        self.factory = factory
        self.id = factory.hub.new_id()
        self.name = name
        self.user = user
        self.grants = grants
        self.peer = peer
        self._request = request
        self._rooms = rooms
        self._since = since
        self._positions: Dict[str, Position] = {}
        self._body: Optional[StreamBody] = None
        self._connected_at = factory.clock.seconds()
        # A sign-in by token lasts until the token's exp (plus the
        # leeway), for a stream as for a WebSocket; a stream cannot
        # refresh it, and is told before it ends.
        self._expiry: Optional[TokenExpiry] = None
        if expires is not None:
            self._expiry = TokenExpiry(
                factory.clock, self, expires, factory.token_refresh_window, factory.token_leeway
            )

    # The stream's life

    def start(self, positions: Dict[str, Position]) -> None:
        """
        Send the welcome, join the rooms, replay what ``Last-Event-ID``
        says was missed.

        :param positions: where each room stands now (for rooms not
            replayed: the stream starts there).
        """
        factory = self.factory
        hub = factory.hub
        self._body = StreamBody(self._request)
        for room in self._rooms:
            position = positions[room]
            since = self._since.get(room)
            if since is not None and since[0] == position[0] and since[1] > position[1]:
                # Ahead of the room (not an id of this server's): from where
                # it stands, or the id would stay stuck there.
                since = self._since[room] = position
            self._positions[room] = since or position
        rooms = {
            room: {"epoch": positions[room][0], "seq": positions[room][1], "rights": self.grants.listed(room)}
            for room in self._rooms
        }
        welcome = {"type": "welcome", "id": self.id, "name": self.name, "user": self.user, "rooms": rooms}
        self._send([b"retry: %d\n" % RETRY_MS + sse_event("welcome", welcome, stream_id(self._positions))])
        hub.connect(self, lobby=False)
        for room in self._rooms:
            hub.join(self, room)
        log_connect(self._log, self.id, self.peer, self.kind, len(hub), self.user, self._rooms)
        if factory.keepalive is not None:
            factory.keepalive.add(self)
        if self._expiry is not None:
            self._expiry.start()
        for room, (epoch, seq) in self._since.items():
            if not self.grants.allows(room, HISTORY):
                self._send([sse_event("refused", {
                    "type": "refused",
                    "room": room,
                    "reason": "not allowed to read the history of room {!r}".format(room),
                })])
                continue
            hub.replay(self, room, epoch, seq).addCallback(self._recovered, room)

    def _recovered(self, complete: bool, room: str) -> None:
        self._send([sse_event("recovered", {"type": "recovered", "room": room, "complete": complete})])

    def gone(self, reason=None) -> None:
        """
        The response is over (the client went, or we closed it).
        """
        self.closing = True
        factory = self.factory
        if factory.keepalive is not None:
            factory.keepalive.remove(self)
        if self._expiry is not None:
            self._expiry.cancel()
        hub = factory.hub
        if hub.member(self.id) is self:
            hub.disconnect(self)
            log_disconnect(
                self._log,
                self.id,
                duration=factory.clock.seconds() - self._connected_at,
                count=len(hub),
                reason=reason.getErrorMessage() if reason is not None else "",
                clean=True,
            )

    # Writing

    def _send(self, pieces: List[bytes]) -> None:
        """
        Queue ``pieces`` (whole events) for the client through its budgeted
        outbound path, or cut it off as a slow consumer.
        """
        if self.closing:
            return
        if not self._body.write(pieces, self.factory.limits.max_buffer):
            self._cut(sum(len(piece) for piece in pieces))
            return
        stats = self.factory.hub.stats
        stats.frames_out += 1
        stats.bytes_out += sum(len(piece) for piece in pieces)

    def deliver(self, event: Event) -> None:
        self.deliver_many((event,))

    def deliver_many(self, batch) -> None:
        pieces: List[bytes] = []
        positions = self._positions
        for event in batch:
            data = encoded(event, _SSE, _encode)
            if not data:
                continue
            if isinstance(event, TextMessage) and event.room in positions:
                last = positions[event.room]
                # Replayed messages may come after later live ones (with
                # a networked backplane): the position only moves forward.
                if last[0] != event.epoch or event.seq > last[1]:
                    positions[event.room] = (event.epoch, event.seq)
                pieces.append(("id: " + stream_id(positions) + "\n").encode("utf-8"))
            pieces.append(data)
        if pieces:
            self._send(pieces)

    # Keepalive: a comment now and then, which needs no answer

    def keepalive_ping(self) -> bool:
        if self.closing:
            return False
        self._send([_PING])
        # Nothing answers a comment: due again after the interval.
        self.factory.keepalive.add(self)
        return False

    def keepalive_timed_out(self) -> None:
        """Never awaited (see :meth:`keepalive_ping`)."""

    # A token's end

    def token_expiring(self, expires: float, seconds: float) -> None:
        self._send([sse_event("expiring", {
            "type": "expiring", "expires": expires, "in": round(max(seconds, 0.0), 3),
        })])

    def token_expired(self) -> None:
        self._log.info(
            "[TOKEN EXPIRED] {client} (user {user!r}): its token expired; ending the stream",
            client=self.id,
            user=self.user,
        )
        self._close(sse_event("disconnected", {"type": "disconnected", "reason": "token expired"}))

    # Closing

    def _close(self, last: Optional[bytes] = None) -> None:
        if self.closing:
            return
        if last is not None:
            self._send([last])
        if self.closing:
            return
        if not self._body.end(self.factory.limits.max_buffer):
            self._cut(0)
        self.closing = True

    def _cut(self, size: int) -> None:
        """
        ``size`` more bytes would take the reader past ``--max-buffer``:
        cut it off as a slow consumer.
        """
        limit = self.factory.limits.max_buffer
        cut_slow_consumer(
            self._log, self, self._body.outbound, size, self.factory.hub.stats, limit, "disconnecting"
        )
        self.closing = True
        self._request.channel.transport.abortConnection()

    def shut_down(self) -> None:
        """
        The server is stopping: end the stream (a browser reconnects, to
        this server once it is back or to another).
        """
        self._close()

    def abort(self) -> None:
        self.closing = True
        self._request.channel.transport.abortConnection()

    def expel(self, reason: str) -> bool:
        """
        The server was told to disconnect this client: say why, and end
        the stream.  A browser reconnecting is refused while its user is
        banned, which ends ``EventSource``'s retries.
        """
        if self.closing:
            return False
        self._close(sse_event("disconnected", {"type": "disconnected", "reason": reason}))
        return True
