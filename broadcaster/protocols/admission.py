"""
One admission policy for every listener: ``--max-connections`` and
``--max-connections-per-ip`` count each connection from the moment it is
accepted, whatever port it came in on (the WebSocket and HTTP port, the
line bridge, the image port) and whether or not it has finished its HTTP
request yet.

A listener's factory mixes in :class:`AdmittingFactory`: it asks the
shared :class:`Admission` before building a protocol, and a connection over
a limit gets a refusal in its own listener's language (HTTP 503, an
``ERROR`` line, an error frame) instead of a protocol.  An admitted
connection holds a :class:`Ticket` until it is lost, however many
protocols take it over in between (an HTTP channel hands its ticket to the
WebSocket protocol that the upgrade makes).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from broadcaster.core.stats import Stats

#: Seconds a refused connection may keep sending (unread) while its
#: client reads the refusal; the same as a raw client the server hangs up on.
LINGER_SECONDS = 2.0


def host_of(address: IAddress) -> str:
    """
    The address connections are counted per: the peer's IP, or the kind of
    address for those without one (UNIX sockets).
    """
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else type(address).__name__


class Ticket:
    """
    An admitted connection's place under the limits, given back once.
    """

    __slots__ = ("_admission", "host")

    def __init__(self, admission: "Admission", host: str) -> None:
        self._admission = admission
        self.host = host

    def release(self) -> None:
        """
        The connection is gone: make room for another.  Only the first
        call counts.
        """
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.host)


class Admission:
    """
    The connection limits shared by every listener of one server process.

    :param max_connections: connections at once (0: no limit).
    :param max_per_ip: connections at once from one address (0: no limit).
    """

    _log = Logger()

    def __init__(self, max_connections: int = 0, max_per_ip: int = 0, stats: Optional[Stats] = None):
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.stats = stats if stats is not None else Stats()
        #: Connections admitted and not yet lost.
        self.connections = 0
        self.per_ip: Dict[str, int] = {}

    def admit(self, address: IAddress, listener: str) -> Union[Ticket, str]:
        """
        Admit a connection just accepted from ``address``.

        :param listener: what it connected to, for the log.
        :return: its :class:`Ticket`, or why it is refused.
        """
        host = host_of(address)
        if self.max_connections and self.connections >= self.max_connections:
            label = "max_connections"
            reason = "the server is full ({} connections)".format(self.max_connections)
        elif self.max_per_ip and self.per_ip.get(host, 0) >= self.max_per_ip:
            label = "max_connections_per_ip"
            reason = "too many connections from {} ({})".format(host, self.max_per_ip)
        else:
            self.connections += 1
            self.per_ip[host] = self.per_ip.get(host, 0) + 1
            return Ticket(self, host)
        self._log.warn(
            "[REFUSED] {host} on the {listener}: {reason}", host=host, listener=listener,
            reason=reason,
        )
        self.stats.refused_handshakes[label] += 1
        return reason

    def _release(self, host: str) -> None:
        self.connections -= 1
        remaining = self.per_ip[host] - 1
        if remaining:
            self.per_ip[host] = remaining
        else:
            del self.per_ip[host]


def say_and_hang_up(transport, last_words: bytes, clock: IReactorTime):
    """
    Send ``last_words`` and close the connection so that the client gets
    to read them (see :class:`Refusal`).

    :return: the call that ends the connection for good after
        :data:`LINGER_SECONDS` (cancel it if it ends sooner), or ``None``.
    """
    transport.write(last_words)
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is None:
        transport.loseConnection()
        return None
    lose_write()
    return clock.callLater(LINGER_SECONDS, transport.abortConnection)


class Refusal(Protocol):
    """
    A connection over a limit: it is told why in its listener's language,
    then hung up on.

    The client has likely sent its request already; closing a socket with
    unread input would make the kernel reset the connection and could
    destroy the refusal before the client reads it.  So: send, shut down
    our side (FIN), discard what still comes, and close for good when the
    client does, or after :data:`LINGER_SECONDS`.
    """

    def __init__(self, message: bytes, clock: IReactorTime) -> None:
        self._message = message
        self._clock = clock
        self._linger = None

    def connectionMade(self) -> None:
        self._linger = say_and_hang_up(self.transport, self._message, self._clock)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()


class AdmittingFactory:
    """
    Mixed into a listener's factory (before the Twisted factory class): the
    connections it builds protocols for are admitted by :attr:`admission`,
    and each protocol gets its :class:`Ticket` as ``ticket``, to release
    when its connection is lost.  Without an admission (unit tests), every
    connection is let in and ``ticket`` is ``None``.

    :ivar listener: what the log calls this listener.
    :ivar refusal: turns a reason into the bytes that tell a client it was refused.
    """

    admission: Optional[Admission] = None
    listener = "listener"
    refusal: Callable[[str], bytes] = staticmethod(lambda reason: b"")

    def buildProtocol(self, addr):
        if self.admission is None:
            return super().buildProtocol(addr)
        admitted = self.admission.admit(addr, self.listener)
        if isinstance(admitted, str):
            return Refusal(self.refusal(admitted), self.clock)
        protocol = super().buildProtocol(addr)
        if protocol is None:
            admitted.release()
            return None
        protocol.ticket = admitted
        return protocol


def http_refusal(reason: str, status: bytes = b"503 Service Unavailable") -> bytes:
    """
    A whole HTTP/1.1 response saying ``reason``, that closes the connection.
    """
    body = (reason + "\n").encode("utf-8")
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
        b"Connection: close\r\nRetry-After: 5\r\n\r\n" + body
    )
