"""
A blocking client for broadcaster's JSON WebSocket protocol (see
docs/protocols.rst), for scripts and programs that do not run Twisted.

It needs ``websocket-client`` (``pip install broadcaster[client]``); the
server does not, which is why :mod:`broadcaster` exports these names
lazily.

Example: run ``twistd -n broadcaster``, then::

    from broadcaster import Client, Recovered

    with Client.connect("ws://localhost:9999/", name="bot", rooms=["dev"]) as client:
        ack = client.send("hello", room="dev")      # {"type": "ack", "seq": ..., ...}
        for event in client:                        # runs until the server expels us
            if isinstance(event, Recovered):
                print("reconnected; complete:", event.complete)
            elif event["type"] == "message":
                print(event["name"], event["text"])

Requests
    :meth:`Client.send`, :meth:`~Client.join`, :meth:`~Client.who` and
    :meth:`~Client.history` send one request with a fresh ``ref`` and read
    until its answer comes (``ack``, ``presence``, ``history``; ``error``
    with that ``ref`` raises :class:`RequestRefused`).  Whatever else
    arrives meanwhile is kept, in order, for iteration: nothing is lost by
    asking.  An answer that comes after its request timed out is handed to
    iteration like any event.  ``leave`` has no answer in the protocol:
    :meth:`~Client.leave` returns once it is sent.

Events
    Iterating over a client (or :meth:`Client.receive`, which takes a
    timeout) yields the server's events as dicts, ``welcome`` and
    ``message`` and ``join`` alike.  A ``binary`` or ``image`` event comes
    with the binary message that follows it as ``event["data"]``.  A
    ``recovered`` event becomes a :class:`Recovered`, not a dict.

Reconnecting
    When the connection drops (a server restart, ``1001`` going away, a
    network failure, ``4008`` slow consumer), the next call reconnects,
    after a wait drawn by :class:`~broadcaster.clients.backoff.Backoff` so
    that a restarted server is not hit by every client at once.  It
    rejoins every room and asks for what it missed
    (:class:`~broadcaster.clients.recovery.Positions`), then yields the new
    ``welcome``, each room's ``presence``, the missed messages and one
    :class:`Recovered` per room:
    ``complete`` false means some are gone for good (the server restarted),
    so reload what you show.  A message seen before is never yielded twice.
    Joins and leaves during the gap are not replayed: the new ``welcome``
    and ``presence`` events say who is there now.

    The server's verdicts are not retried: close codes 4001 (token expired),
    4003 (disconnected by the server), 1008 (rate limit), 1009 (message too
    big) and protocol errors, and handshakes refused with a 4xx status,
    raise :class:`ConnectionClosed` or :class:`HandshakeRefused`, and so
    does every later call.  A request under way when the connection drops
    is asked again on the new one, except :meth:`Client.send`: its
    message may or may not have gone out, so it raises a
    :class:`ConnectionClosed` whose ``final`` is false (the next call
    reconnects, and iteration then shows the message if it went out).

Timeouts
    :meth:`Client.connect` takes a ``timeout`` for connecting, the
    handshake, the ``welcome`` and the first joins together; it is also
    the default of every request, whose ``timeout`` covers reconnecting,
    sending and the answer.  :meth:`Client.receive` waits at most its
    ``timeout`` (``None``: as long as it takes, reconnecting meanwhile).
    A server silent for ``keepalive`` seconds (30) is pinged, and one
    silent as long again is taken for gone, so that a connection whose
    peer vanished without a word is not waited on for ever.

Errors
    Everything raised for network or server trouble is a
    :class:`ClientError`: :class:`ConnectError` (and its
    :class:`HandshakeRefused`), :class:`ConnectionClosed`,
    :class:`RequestRefused` and :class:`RequestTimeout`.  Bad arguments
    (a text larger than the server's ``max_message_size``) raise
    :class:`ValueError`.

Threads
    A client is read by whichever call waits on it, so it serves one thread
    at a time: a second thread calling in meanwhile gets a
    :class:`ClientError` at once.  :meth:`Client.close` is the exception:
    from another thread it wakes the one that is waiting.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, Optional, Union
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

try:
    import websocket
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "broadcaster.Client needs websocket-client: pip install broadcaster[client]"
    ) from e

from broadcaster.clients.backoff import Backoff
from broadcaster.clients.recovery import Positions
from broadcaster.core.names import LOBBY
from broadcaster.protocols.wire import JSON_SUBPROTOCOL

__all__ = [
    "Client",
    "ClientError",
    "ConnectError",
    "HandshakeRefused",
    "ConnectionClosed",
    "RequestRefused",
    "RequestTimeout",
    "Recovered",
]

#: Close codes that are the server's verdict on this client, not an
#: accident: reconnecting would only be closed again (or, for 4001 and
#: 4003, refused), so they end the client.
FINAL_CLOSE_CODES = frozenset(
    [
        1002,  # protocol error
        1003,  # unsupported data
        1007,  # invalid UTF-8
        1008,  # kept sending past --rate
        1009,  # message too big
        1010,  # extension negotiation
        4001,  # token expired
        4003,  # disconnected by the server
    ]
)

#: HTTP statuses of a refused handshake worth trying again after a wait:
#: the server is busy (503, over --max-connections) or restarting behind a
#: proxy (502, 504); other 4xx (403: bad token, banned) are verdicts.
RETRIED_STATUSES = frozenset([408, 429, 500, 502, 503, 504])

#: Seconds a connection must have lasted for its drop to count as an
#: accident rather than a refusal: only then does the backoff start again
#: from the shortest wait.  A server that accepts and drops at once is
#: thereby retried ever more slowly.
STABLE = 10.0

#: Seconds of silence from the server before it is pinged, and again
#: before the connection is given up: the server pings every 25 s by
#: default (``--ping-interval``), so a live one is never pinged.
KEEPALIVE = 30.0

#: Events kept for iteration at most (see ``max_pending``).
MAX_PENDING = 10000

# Reads never get a zero timeout: websocket-client would then put the
# socket in non-blocking mode, which it does not handle.
_SHORTEST_WAIT = 0.001

Event = Union[Dict[str, Any], "Recovered"]


# Exceptions


class ClientError(Exception):
    """
    Base class of everything this module raises for network or server
    trouble.
    """


class ConnectError(ClientError):
    """
    Could not connect: the message names the server and why (refused,
    unreachable, no answer in time, no ``welcome``).
    """


class HandshakeRefused(ConnectError):
    """
    The server answered the WebSocket handshake with an HTTP error.

    :ivar status: the HTTP status, such as 403 (no or bad token, banned) or
        503 (too many connections).
    :ivar reason: the server's reason phrase.
    """

    def __init__(self, where: str, status: int, reason: str) -> None:
        super().__init__(
            "{} refused the handshake: HTTP {} {}".format(where, status, reason).rstrip()
        )
        self.status = status
        self.reason = reason


class ConnectionClosed(ClientError):
    """
    The connection ended.

    :ivar code: the close code the server sent (see docs/protocols.rst),
        or ``None`` if the connection was lost without one.
    :ivar reason: the server's reason, or what went wrong.
    :ivar final: whether the client is done for: the server's verdict
        (:data:`FINAL_CLOSE_CODES`), ``reconnect=False``, or
        :meth:`Client.close`.  If not, the next call reconnects.
    """

    def __init__(self, code: Optional[int], reason: str, final: bool) -> None:
        how = "closed with {}".format(code) if code is not None else "lost"
        super().__init__(
            "connection {}{}".format(how, ": " + reason if reason else "")
        )
        self.code = code
        self.reason = reason
        self.final = final


class RequestRefused(ClientError):
    """
    The server answered a request with an ``error``; the connection stays
    open.

    :ivar reason: the server's reason.
    :ivar ref: the request's ``ref``.
    :ivar request: the request's type (``message``, ``join``, ...).
    """

    def __init__(self, reason: str, ref: Any, request: str) -> None:
        super().__init__("the server refused {} {}: {}".format(request, ref, reason))
        self.reason = reason
        self.ref = ref
        self.request = request


class RequestTimeout(ClientError):
    """
    A request got no answer within its timeout.  The connection stays
    open; if the answer comes later, iteration yields it.

    :ivar request: the request's type.
    :ivar timeout: the seconds waited.
    """

    def __init__(self, request: str, timeout: float) -> None:
        super().__init__("no answer to {} within {:g} s".format(request, timeout))
        self.request = request
        self.timeout = timeout


@dataclass(frozen=True)
class Recovered:
    """
    After a reconnect, the end of what was missed in ``room``.

    :ivar complete: whether every missed message was replayed (before this
        event); if not (the server restarted, or forgot them), reload.
    """

    room: str
    complete: bool


# The client


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _answer_to(kind: str, room: str) -> Callable[[Dict[str, Any], Any], bool]:
    """
    How the answer to a request about ``room`` is recognised: ``presence``
    and ``history`` carry the room, not the ``ref``.
    """
    return lambda event, ref: event.get("type") == kind and event.get("room") == room


def _ack(event: Dict[str, Any], ref: Any) -> bool:
    return event.get("type") == "ack" and event.get("ref") == ref


class Client:
    """
    A connection to a broadcaster server in JSON mode, kept up across
    drops: see the module docstring.  Make one with :meth:`connect`.
    ``Client(url, ...)`` alone does not connect: its first call does,
    retrying as after a drop.

    :param url: ``ws://host:port/`` or ``wss://...``.
    :param name: the display name (``?name=``).
    :param token: a signed token, sent as ``Authorization: Bearer``.
    :param rooms: rooms to join besides the lobby.
    :param timeout: seconds for connecting (the handshake, the ``welcome``
        and the joins together), and the default timeout of requests.
    :param reconnect: ``False`` to raise :class:`ConnectionClosed` on a
        drop instead of reconnecting.
    :param backoff: the waits between reconnects.
    :param keepalive: seconds of silence from the server after which it
        is pinged, and then taken for gone.
    :param max_pending: events kept for iteration while the caller does
        something else (they arrive while a request awaits its answer);
        beyond it the oldest are dropped, counted in :attr:`dropped`, so a
        script that only sends does not keep everyone's messages for ever.

    :ivar id: the connection's id (it changes on every reconnect).
    :ivar user: the user the server signed us in as, or ``None``.
    :ivar limits: the ``limits`` of the last ``welcome``.
    :ivar welcome: the last ``welcome`` itself.
    :ivar dropped: events dropped because more than ``max_pending`` waited.
    """

    def __init__(
        self,
        url: str,
        name: Optional[str] = None,
        token: Optional[str] = None,
        rooms: Iterable[str] = (),
        timeout: float = 10.0,
        reconnect: bool = True,
        backoff: Optional[Backoff] = None,
        keepalive: float = KEEPALIVE,
        max_pending: int = MAX_PENDING,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError("a ws:// or wss:// URL is needed, not {!r}".format(url))
        if timeout <= 0 or keepalive <= 0:
            raise ValueError("timeouts must be positive, not {!r}".format(min(timeout, keepalive)))
        # Messages name the server without the query, which may hold a token.
        self._where = urlunsplit(parts._replace(query="", fragment=""))
        self._url = url if name is None else _with_query(url, name=name)
        self._headers = [] if token is None else ["Authorization: Bearer " + token]
        self.timeout = timeout
        self._reconnect = reconnect
        self._backoff = backoff if backoff is not None else Backoff()
        self._positions = Positions(rooms)
        self._ws: Optional[websocket.WebSocket] = None
        self._opened_at = 0.0
        self._keepalive = keepalive
        # When the server was last heard from, and whether it was pinged since.
        self._heard_at = 0.0
        self._pinged = False
        self._pending: Deque[Event] = deque(maxlen=max_pending)
        self.dropped = 0
        # The header of a binary or image event, until its bytes come.
        self._header: Optional[Dict[str, Any]] = None
        self._refs = 0
        self._retry_at: Optional[float] = None
        self._last_failure: Optional[ClientError] = None
        self._final: Optional[ConnectionClosed] = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.id: Optional[str] = None
        self.user: Optional[str] = None
        self.limits: Dict[str, Any] = {}
        self.welcome: Optional[Dict[str, Any]] = None

    @classmethod
    def connect(cls, url: str, **options: Any) -> "Client":
        """
        Connect, read the ``welcome`` and join the ``rooms``; the lobby is
        joined from the start.  ``options`` are those of :class:`Client`.

        This first connection is not retried: a wrong URL or token fails
        here, at once, rather than in a loop.

        :raise ConnectError: or :class:`HandshakeRefused`.
        :raise RequestRefused: if one of the rooms cannot be joined.
        :raise RequestTimeout: if a join got no answer.
        """
        client = cls(url, **options)
        with client._exclusive():
            try:
                client._open(time.monotonic() + client.timeout)
            except BaseException:
                client._abandon()
                raise
        return client

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "open" if self._ws else "disconnected"
        return "<Client {} {} {}>".format(self.id, state, self._where)

    @property
    def rooms(self) -> list:
        """
        The rooms it is in (or will rejoin on reconnecting), the lobby first.
        """
        return self._positions.rooms()

    # Requests

    def send(self, text: str, room: str = LOBBY, timeout: Optional[float] = None) -> Dict[str, Any]:
        """
        Send a text message to ``room``.

        :return: the ``ack``: ``seq`` and ``epoch`` of the message.
        :raise RequestRefused: if the server refused it (not in the room,
            not allowed, over the rate).
        :raise ConnectionClosed: if the connection dropped before the
            ``ack``: the message may or may not have gone out.
        """
        request = {"type": "message", "text": text, "room": room}
        return self._request(request, _ack, timeout, retry=False)

    def join(self, room: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """
        Join ``room`` (and rejoin it after every reconnect).

        :return: the ``presence`` answering it: who is there, and ``rights``.
        :raise RequestRefused: if the server refused (not allowed, too many rooms).
        """
        fresh = room not in self._positions.rooms()
        self._positions.want(room)
        try:
            return self._request(
                {"type": "join", "room": room}, _answer_to("presence", room), timeout
            )
        except RequestTimeout:
            # The server may have let us in: stay, and rejoin after a drop.
            raise
        except BaseException:
            if fresh:
                self._positions.drop(room)
            raise

    def leave(self, room: str, timeout: Optional[float] = None) -> None:
        """
        Leave ``room``, and do not rejoin it after a reconnect.  The server
        does not answer a leave: this returns once it is sent (or at once,
        if the connection is down: the next one will not join the room).
        """
        with self._exclusive():
            self._check_usable()
            self._positions.drop(room)
            if self._ws is None:
                return
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            try:
                self._send({"type": "leave", "room": room, "ref": self._new_ref()}, deadline)
            except ConnectionClosed as e:
                if e.final:
                    raise

    def who(
        self, room: str = LOBBY, cursor: Optional[str] = None, timeout: Optional[float] = None
    ) -> Dict[str, Any]:
        """
        Who is in ``room``: a ``presence`` with ``count`` and one page of
        ``members``; pass its ``next`` as ``cursor`` for the next page.
        """
        request: Dict[str, Any] = {"type": "who", "room": room}
        if cursor is not None:
            request["cursor"] = cursor
        return self._request(request, _answer_to("presence", room), timeout)

    def history(
        self,
        room: str = LOBBY,
        limit: Optional[int] = None,
        before: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Dict[str, Any]:
        """
        The last messages of ``room``: a ``history`` with ``messages``
        (oldest first) and ``more`` (older ones are kept: ask again with
        ``before`` set to the oldest ``seq`` received).
        """
        request: Dict[str, Any] = {"type": "history", "room": room}
        if limit is not None:
            request["limit"] = limit
        if before is not None:
            request["before"] = before
        return self._request(request, _answer_to("history", room), timeout)

    def send_binary(self, data: bytes, timeout: Optional[float] = None) -> None:
        """
        Send a binary message to the lobby.  The server does not answer it.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._exclusive():
            while True:
                self._open_by(deadline, "binary", timeout)
                try:
                    self._drain()
                    self._send(bytes(data), deadline)
                    return
                except ConnectionClosed as e:
                    if e.final:
                        raise

    def _request(
        self,
        request: Dict[str, Any],
        answer: Callable[[Dict[str, Any], Any], bool],
        timeout: Optional[float],
        retry: bool = True,
    ) -> Dict[str, Any]:
        """
        Send ``request`` with a fresh ``ref`` and read until ``answer``
        recognises its answer; queue the rest.

        :param retry: whether to ask again on a new connection if this one
            drops before the answer (only for requests that can be repeated).
        """
        what = request["type"]
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._exclusive():
            while True:
                self._open_by(deadline, what, timeout)
                try:
                    # A close or a drop that came while we were not reading
                    # is noticed now, before the request is spent on it.
                    self._drain()
                except ConnectionClosed as e:
                    if e.final:
                        raise
                    continue
                ref = self._new_ref()
                try:
                    self._send(dict(request, ref=ref), deadline)
                    return self._answer(ref, answer, deadline, what, timeout)
                except ConnectionClosed as e:
                    if e.final or not retry:
                        raise

    def _answer(
        self,
        ref: Any,
        answer: Callable[[Dict[str, Any], Any], bool],
        deadline: float,
        what: str,
        timeout: float,
    ) -> Dict[str, Any]:
        while True:
            event = self._read(deadline)
            if event is None:
                raise RequestTimeout(what, timeout)
            if isinstance(event, dict):
                if event.get("type") == "error" and event.get("ref") == ref:
                    raise RequestRefused(str(event.get("reason")), ref, what)
                if answer(event, ref):
                    return event
            self._keep(event)

    def _keep(self, event: Event) -> None:
        """
        Keep ``event`` for iteration (the oldest goes if too many wait).
        """
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(event)

    def _new_ref(self) -> int:
        self._refs += 1
        return self._refs

    # Events

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        """
        The next event, waiting as long as it takes; the iteration ends
        when :meth:`close` is called.
        """
        if self._closed.is_set() and not self._pending:
            raise StopIteration
        try:
            return self.receive()
        except ClientError:
            if self._closed.is_set():
                raise StopIteration from None
            raise

    def receive(self, timeout: Optional[float] = None) -> Optional[Event]:
        """
        The next event, reconnecting if need be.

        :param timeout: seconds to wait at most; ``None`` for as long as it
            takes.
        :return: the event, or ``None`` if none came in time.
        :raise ConnectionClosed: if the connection ended for good (see
            its ``final``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._exclusive():
            while not self._pending:
                self._check_usable()
                if self._ws is None:
                    if not self._reopen(deadline):
                        return None
                    # The new connection's welcome comes first.
                    continue
                try:
                    return self._read(deadline)
                except ConnectionClosed as e:
                    if e.final:
                        raise
            return self._pending.popleft()

    def close(self, timeout: float = 2.0) -> None:
        """
        Close the connection (with a WebSocket close handshake, waiting
        ``timeout`` seconds at most for the server's reply).  From another
        thread, it wakes the thread waiting on the client, whose iteration
        then ends.  Closing twice is harmless.
        """
        self._closed.set()
        if not self._lock.acquire(blocking=False):
            ws = self._ws
            if ws is not None:
                ws.abort()
            return
        try:
            ws, self._ws = self._ws, None
            if ws is not None:
                ws.close(timeout=timeout)
        finally:
            self._lock.release()

    # Reading

    def _read(self, deadline: Optional[float]) -> Optional[Event]:
        """
        The next event from the connection, or ``None`` if the deadline
        passed.  Binary headers wait for their bytes; duplicates are dropped.

        A server silent for ``keepalive`` seconds is pinged; if it is
        silent as long again, the connection is taken for dead (a peer gone
        without a FIN would otherwise block an iteration for ever).

        :raise ConnectionClosed: if the connection dropped.
        """
        ws = self._ws
        assert ws is not None
        while True:
            now = time.monotonic()
            wait = self._heard_at + self._keepalive - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            ws.settimeout(max(wait, _SHORTEST_WAIT))
            try:
                opcode, data = ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                # websocket-client keeps a partly read frame for the next call.
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                if now >= self._heard_at + self._keepalive:
                    self._ping(now)
                continue
            except (websocket.WebSocketException, OSError) as e:
                self._lost(None, str(e) or e.__class__.__name__)
            self._heard_at = time.monotonic()
            self._pinged = False
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                self._lost(code, data[2:].decode("utf-8", "replace"))
            if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
                # websocket-client has answered a ping already.
                continue
            event = self._event(opcode, data)
            if event is not None:
                return event

    def _ping(self, now: float) -> None:
        """
        The server has been silent for ``keepalive`` seconds: ping it, or,
        if that was already done, give the connection up.
        """
        if self._pinged:
            self._lost(None, "no answer to a ping within {:g} s".format(self._keepalive))
        try:
            self._ws.ping()
        except (websocket.WebSocketException, OSError) as e:
            self._lost(None, str(e) or e.__class__.__name__)
        self._pinged = True
        self._heard_at = now

    def _event(self, opcode: int, data: Any) -> Optional[Event]:
        if opcode == websocket.ABNF.OPCODE_BINARY:
            event, self._header = self._header, None
            if event is None:
                # Every binary message follows its header: this is not
                # the protocol, but the bytes are not ours to drop.
                event = {"type": "binary", "size": len(data)}
            event["data"] = data
            return event
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ClientError(
                "{} sent something that is not a JSON event: {!r}".format(self._where, data[:80])
            )
        kind = event["type"]
        if kind in ("binary", "image"):
            self._header = event
            return None
        if kind == "message" and not self._positions.saw(event):
            return None
        if kind == "recovered":
            return Recovered(str(event.get("room")), bool(event.get("complete")))
        if kind == "presence":
            self._positions.started(event.get("room"), event.get("epoch"), event.get("seq"))
        return event

    def _drain(self) -> None:
        """
        Queue what has already arrived (answering pings on the way).
        """
        while True:
            event = self._read(time.monotonic())
            if event is None:
                return
            self._keep(event)

    def _send(self, request: Union[Dict[str, Any], bytes], deadline: float) -> None:
        ws = self._ws
        assert ws is not None
        if isinstance(request, bytes):
            payload, opcode = request, websocket.ABNF.OPCODE_BINARY
        else:
            payload = json.dumps(request, ensure_ascii=False).encode("utf-8")
            opcode = websocket.ABNF.OPCODE_TEXT
        limit = self.limits.get("max_message_size")
        if isinstance(limit, int) and len(payload) > limit:
            # The server would close the connection (1009) for good.
            raise ValueError(
                "a request of {} bytes is larger than the server's limit of {} bytes".format(
                    len(payload), limit
                )
            )
        ws.settimeout(max(deadline - time.monotonic(), _SHORTEST_WAIT))
        try:
            ws.send(payload, opcode)
        except websocket.WebSocketTimeoutException:
            # The server is not reading, and part of a frame may be out:
            # this connection is no use any more.
            self._lost(None, "the server took no data for the whole timeout")
        except (websocket.WebSocketException, OSError) as e:
            self._lost(None, str(e) or e.__class__.__name__)

    # Connecting

    def _open(self, deadline: float) -> None:
        """
        Connect, read the ``welcome``, join the rooms (recovering what was
        missed, after a first connection).

        :raise ConnectError: or :class:`HandshakeRefused`,
            :class:`ConnectionClosed`, :class:`RequestTimeout`,
            :class:`RequestRefused` (a first connection's rooms only).
        """
        first = self.welcome is None
        timeout = max(deadline - time.monotonic(), _SHORTEST_WAIT)
        try:
            self._ws = websocket.create_connection(
                self._positions.url(self._url),
                timeout=timeout,
                subprotocols=[JSON_SUBPROTOCOL],
                header=self._headers,
            )
        except websocket.WebSocketBadStatusException as e:
            reason = getattr(e, "status_message", None) or ""
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            raise HandshakeRefused(self._where, e.status_code, reason) from None
        except (websocket.WebSocketTimeoutException, TimeoutError):
            raise ConnectError(
                "cannot connect to {}: no answer within {:.3g} s".format(self._where, timeout)
            ) from None
        except (websocket.WebSocketException, OSError) as e:
            why = getattr(e, "strerror", None) or str(e) or e.__class__.__name__
            raise ConnectError("cannot connect to {}: {}".format(self._where, why)) from e
        self._opened_at = self._heard_at = time.monotonic()
        self._pinged = False
        welcome = self._read(deadline)
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            what = "nothing" if welcome is None else repr(welcome)[:80]
            raise ConnectError(
                "{} sent {} instead of a welcome within {:.3g} s".format(self._where, what, timeout)
            )
        self.welcome = welcome
        self.id = welcome.get("id")
        self.user = welcome.get("user")
        self.limits = welcome.get("limits") or {}
        self._positions.started(LOBBY, welcome.get("epoch"), welcome.get("seq"))
        if not first:
            self._keep(welcome)
        for join in self._positions.joins():
            room = join["room"]
            ref = self._new_ref()
            self._send(dict(join, ref=ref), deadline)
            try:
                presence = self._answer(ref, _answer_to("presence", room), deadline, "join", timeout)
                if not first:
                    self._keep(presence)
            except RequestRefused as refused:
                if first:
                    raise
                # Allowed before the drop, no longer (a new token, a full
                # room list): iteration tells the caller.
                self._positions.drop(room)
                self._keep(
                    {"type": "error", "reason": refused.reason, "ref": ref, "room": room}
                )

    def _reopen(self, deadline: Optional[float]) -> bool:
        """
        Reconnect, waiting between attempts as the backoff says.

        :return: ``False`` if ``deadline`` passed first.
        :raise ConnectionClosed: or :class:`HandshakeRefused`, for a
            verdict of the server.
        """
        while self._ws is None:
            now = time.monotonic()
            if self._retry_at is None:
                self._retry_at = now + self._backoff.next()
            if deadline is not None and self._retry_at > deadline:
                self._closed.wait(max(deadline - now, 0))
                self._check_usable()
                return False
            if self._closed.wait(max(self._retry_at - now, 0)):
                self._check_usable()
            self._retry_at = None
            now = time.monotonic()
            attempt = now + self.timeout if deadline is None else min(deadline, now + self.timeout)
            try:
                self._open(max(attempt, now + _SHORTEST_WAIT))
            except HandshakeRefused as e:
                self._abandon()
                if e.status not in RETRIED_STATUSES:
                    self._final = ConnectionClosed(None, str(e), final=True)
                    raise
                self._last_failure = e
            except (ConnectError, RequestTimeout) as e:
                self._abandon()
                self._last_failure = e
            except ConnectionClosed as e:
                if e.final:
                    raise
                self._last_failure = e
            except BaseException:
                # A lazily made client's rooms refused, or worse: not
                # worth retrying, nor a connection left half open.
                self._abandon()
                raise
        return True

    def _open_by(self, deadline: float, what: str, timeout: float) -> None:
        """
        Make sure a connection is open, reconnecting by ``deadline``.

        :raise ConnectError: the last attempt's, if none succeeded in time
            (:class:`RequestTimeout` if none was made).
        """
        self._check_usable()
        self._last_failure = None
        if not self._reopen(deadline):
            raise self._last_failure or RequestTimeout(what, timeout)

    def _lost(self, code: Optional[int], reason: str) -> None:
        """
        The connection dropped: forget it and raise :class:`ConnectionClosed`,
        final if the server meant it (see :data:`FINAL_CLOSE_CODES`).
        """
        if time.monotonic() - self._opened_at >= STABLE:
            self._backoff.reset()
        self._abandon()
        final = code in FINAL_CLOSE_CODES or not self._reconnect or self._closed.is_set()
        error = ConnectionClosed(code, reason, final)
        if final and not self._closed.is_set():
            self._final = error
        raise error

    def _abandon(self) -> None:
        """
        Drop the connection at once, and the binary header it left waiting.
        """
        ws, self._ws = self._ws, None
        self._header = None
        if ws is not None:
            ws.shutdown()

    def _check_usable(self) -> None:
        if self._closed.is_set():
            raise ClientError("this client is closed")
        if self._final is not None:
            final = self._final
            raise ConnectionClosed(final.code, final.reason, final=True)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """
        Hold the client for one call: whoever waits on it reads for
        everyone, so two threads at once would steal each other's answers.
        """
        if not self._lock.acquire(blocking=False):
            raise ClientError(
                "this client is in use by another thread: use it from one thread at a time"
            )
        try:
            yield
        finally:
            self._lock.release()
