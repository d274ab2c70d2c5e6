"""
Per-connection flow limits: how fast a client may send, and the limits
every protocol applies (:class:`Limits`).  How much may queue up for a
client that reads slowly is kept by :mod:`broadcaster.protocols.outbound`.

Both exist so that one misbehaving client costs only itself: a phone on a
bad network must not make the server hold gigabytes for it, and a flooding
script must not take the fan-out from everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from twisted.internet.interfaces import IReactorTime


class TokenBucket:
    """
    A token bucket: ``rate`` messages per second on average, with bursts of
    up to ``burst``.

    :param rate: tokens added per second; 0 means unlimited.
    """

    __slots__ = ("_clock", "rate", "burst", "_tokens", "_updated")

    def __init__(self, clock: IReactorTime, rate: float, burst: int) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated: Optional[float] = None

    def take(self) -> bool:
        """
        Spend one token if there is one.

        :return: whether the message may go through.
        """
        if not self.rate:
            return True
        now = self._clock.seconds()
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class RateLimit:
    """
    A client's sending allowance, and when refusing it becomes closing it.

    Excess messages are dropped.  A client that keeps sending while it has
    no allowance, more than ``burst`` dropped messages in a row, is not
    making a mistake but flooding, and is disconnected.
    """

    __slots__ = ("_bucket", "dropped_in_a_row")

    def __init__(self, clock: IReactorTime, rate: float, burst: int) -> None:
        self._bucket = TokenBucket(clock, rate, burst)
        self.dropped_in_a_row = 0

    def allow(self) -> bool:
        """
        :return: whether this message may go through.
        """
        if self._bucket.take():
            self.dropped_in_a_row = 0
            return True
        self.dropped_in_a_row += 1
        return False

    @property
    def abusive(self) -> bool:
        """
        Whether the client has kept flooding past its burst.
        """
        return self.dropped_in_a_row > self._bucket.burst


@dataclass(frozen=True)
class Limits:
    """
    The per-client limits every protocol applies; one object so that the
    options are read in one place (:mod:`broadcaster.service.tap`).

    :ivar max_buffer: bytes a client may fall behind before it is closed as
        a slow consumer.
    :ivar rate: messages per second a client may send on average (0: no limit).
    :ivar burst: messages a client may send at once above ``rate``.
    :ivar max_message_size: largest WebSocket message or frame accepted.
    :ivar max_connections: connections at once, every port (0: no limit).
    :ivar max_connections_per_ip: connections from one address (0: no limit).
    :ivar ping_interval: seconds between keepalive pings (0: none).
    :ivar ping_timeout: seconds a client has to answer a ping.
    :ivar open_handshake_timeout: seconds a client has to finish the handshake.
    :ivar compression: whether permessage-deflate may be negotiated.
    :ivar raw_idle_timeout: seconds a raw-TCP client may send nothing (0: no limit).
    :ivar max_image_size: largest image accepted, from the image port or
        uploaded by a JSON client (announced by an ``image`` request).
    """

    max_buffer: int = 16 * 1024 * 1024
    rate: float = 100.0
    burst: int = 500
    max_message_size: int = 64 * 1024
    max_connections: int = 50000
    max_connections_per_ip: int = 0
    ping_interval: float = 25.0
    ping_timeout: float = 10.0
    open_handshake_timeout: float = 10.0
    compression: bool = False
    raw_idle_timeout: float = 900.0
    max_image_size: int = 16 * 1024 * 1024
