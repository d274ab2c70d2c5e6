"""
Keepalive pings for every connection on one timer.

A peer that vanished without a FIN (dead Wi-Fi, a phone that went to sleep)
is only noticed by asking it something: each client is pinged every
``interval`` seconds and dropped if it does not answer within ``timeout``.

One :class:`~twisted.internet.base.DelayedCall` per connection would cost
about 750 bytes each (the call, its bound method, its place in the
reactor's heap), and idle connections are where memory matters.  Instead
:class:`Keepalive` keeps a timing wheel: connections are filed under the
tick (one second by default) at which they are next due, and a single
:class:`~twisted.internet.task.LoopingCall` handles each tick's connections
in turn.  A ping thus goes out between ``interval`` and ``interval`` plus
one tick after the last answer, and a peer is dropped between ``timeout``
and ``timeout`` plus one tick after its ping; the load stays spread over
time as the connections' own timers spread it.

The loop runs only while some connection is registered, like the
per-connection timers it replaces: a server with no clients has no timer.
"""

from __future__ import annotations

import math
from typing import Dict, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class Pingable(Protocol):
    """
    What :class:`Keepalive` needs from a connection.
    """

    def keepalive_ping(self) -> bool:
        """
        Send a ping; ``False`` if the connection is closing and wants no
        more pings.
        """

    def keepalive_timed_out(self) -> None:
        """
        The ping went unanswered for ``timeout`` seconds: drop the connection.
        """


class Keepalive:
    """
    Pings every registered connection every ``interval`` seconds and reports
    those that do not answer within ``timeout``.

    :param interval: seconds between an answer and the next ping.
    :param timeout: seconds a connection has to answer a ping.
    :param tick: the timer's resolution in seconds (at most ``interval``
        and ``timeout``).
    """

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, interval: float, timeout: float, tick: float = 1.0
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        tick = min(tick, interval, timeout)
        self._ping_ticks = max(1, math.ceil(interval / tick))
        self._pong_ticks = max(1, math.ceil(timeout / tick))
        self._clock = clock
        self._loop = self._new_loop()
        self._tick = tick
        #: Ticks since the loop started.
        self._now = 0
        #: Due tick -> {connection: whether it is awaiting a pong}.
        self._wheel: Dict[int, Dict[Pingable, bool]] = {}
        #: Connection -> the tick it is filed under.
        self._due: Dict[Pingable, int] = {}

    def _new_loop(self) -> LoopingCall:
        loop = LoopingCall.withCount(self._advance)
        loop.clock = self._clock
        return loop

    def __len__(self) -> int:
        return len(self._due)

    def add(self, connection: Pingable) -> None:
        """
        Ping ``connection`` in ``interval`` seconds, and so on until it is
        :meth:`remove`\\ d.
        """
        if not self._loop.running:
            self._now = 0
            # A new loop: one restarted would count every tick of the time
            # it was stopped, and time out the newcomer at its first tick.
            self._loop = self._new_loop()
            self._loop.start(self._tick, now=False)
        self._file(connection, self._ping_ticks, False)

    def pong(self, connection: Pingable) -> None:
        """
        ``connection`` answered: its next ping is ``interval`` seconds away.
        A pong nobody asked for (RFC 6455 allows them) changes nothing.
        """
        due = self._due.get(connection)
        if due is not None and self._wheel[due][connection]:
            self._unfile(connection)
            self._file(connection, self._ping_ticks, False)

    def remove(self, connection: Pingable) -> None:
        """
        Stop pinging ``connection`` (it is gone, or going).
        """
        if connection in self._due:
            self._unfile(connection)
        if not self._due and self._loop.running:
            self._loop.stop()

    def _file(self, connection: Pingable, ticks: int, awaiting_pong: bool) -> None:
        due = self._now + ticks
        self._due[connection] = due
        bucket = self._wheel.get(due)
        if bucket is None:
            bucket = self._wheel[due] = {}
        bucket[connection] = awaiting_pong

    def _unfile(self, connection: Pingable) -> None:
        due = self._due.pop(connection)
        bucket = self._wheel[due]
        del bucket[connection]
        if not bucket:
            del self._wheel[due]

    def _advance(self, count: int) -> None:
        """
        The loop's call: handle every tick since the last (more than one if
        the reactor was too busy to call on time).
        """
        for _ in range(count):
            self._now += 1
            bucket = self._wheel.get(self._now)
            # Popped one at a time: dropping one connection may remove
            # others from this very bucket.
            while bucket:
                connection, awaiting_pong = bucket.popitem()
                del self._due[connection]
                try:
                    if awaiting_pong:
                        connection.keepalive_timed_out()
                    elif connection.keepalive_ping():
                        self._file(connection, self._pong_ticks, True)
                except Exception:
                    # One connection's failure must not stop everyone's pings.
                    self._log.failure("keepalive failed for {connection!r}", connection=connection)
            self._wheel.pop(self._now, None)
        if not self._due and self._loop.running:
            self._loop.stop()
