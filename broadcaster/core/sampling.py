"""
The operator dashboard's figures, from the one place that counts them.

A :class:`Sampler` reads the hub's :class:`~broadcaster.core.stats.Stats`,
the same counters ``/metrics`` reads when it is scraped, once a second
(a timer service calls :meth:`Sampler.sample`), and turns what they
gained since the last reading into rates per second.  Nothing is counted
a second time for the dashboard: connections by kind, messages,
deliveries, bytes, cuts, refusals (of handshakes by reason, of HTTP
requests by status) and the fan-out histogram are the metrics' own
numbers, and a room's message rate is how far its sequence number moved
(:meth:`~broadcaster.core.hub.Hub.positions`).

It keeps the last :data:`WINDOW` samples, so that a dashboard opened now
shows the last 15 minutes at once, and hands each new sample to its
listeners (the dashboard's live streams).  While somebody listens it also
ranks the rooms, which costs a pass over them, so only then.

A sample, as the dashboard's stream sends it (rates are per second over
the interval since the previous sample; ``fan_out_mean`` and
``fan_out_p95`` are ``null`` when nothing was fanned out)::

    {"t": 1767225600.0, "node": "9b1e0c",
     "connections": {"plain": 3, "json": 12, "line": 0, "image": 1, "sse": 2},
     "rooms": 4, "messages_in": 41.0, "deliveries": 380.0, "bytes_out": 51234.0,
     "fan_out_mean": 0.00012, "fan_out_p95": 0.00025,
     "slow_consumers": 0.0, "rate_limited": 2.0, "refused": {"origin": 1.0},
     "refused_requests": {"408": 0.0}}

Rooms, ranked (``rate`` is ``null`` until two readings of the room exist)::

    {"t": ..., "count": 4,
     "by_members": [{"room": "lobby", "members": 18, "rate": 40.0}, ...],
     "by_rate": [{"room": "lobby", "members": 18, "rate": 40.0}, ...]}

``members`` and ``rate`` cover every node sharing the backplane (members
are the rooms' seats, a signed-in user once; every node sees every
room's messages); the other figures are this node's.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from broadcaster.core.hub import Hub
from broadcaster.core.stats import KINDS, Stats

#: Samples kept: 15 minutes at one a second.
WINDOW = 15 * 60

#: Rooms listed in each ranking.
TOP_ROOMS = 10

#: A listener: called with each new sample and, while anybody listens,
#: the rooms ranked.
Listener = Callable[[dict, dict], None]


@dataclass(frozen=True)
class Reading:
    """
    The cumulative counters the rates are taken from, at one instant.
    """

    at: float
    messages_in: int
    deliveries: int
    bytes_out: int
    slow_consumers: int
    rate_limited: int
    refused: Mapping[str, int]
    refused_requests: Mapping[str, int]
    fan_out_count: int
    fan_out_sum: float
    fan_out_buckets: Tuple[int, ...]

    @classmethod
    def of(cls, stats: Stats, at: float) -> "Reading":
        histogram = stats.fan_out_seconds
        return cls(
            at=at,
            messages_in=sum(stats.messages_in.values()),
            deliveries=stats.deliveries,
            bytes_out=stats.bytes_out,
            slow_consumers=stats.slow_consumers,
            rate_limited=stats.rate_limited,
            refused=dict(stats.refused_handshakes),
            refused_requests=dict(stats.refused_requests),
            fan_out_count=histogram.count,
            fan_out_sum=histogram.sum,
            fan_out_buckets=tuple(histogram.counts),
        )


def quantile_bound(bounds: Sequence[float], counts: Sequence[int], q: float) -> Optional[float]:
    """
    The upper bound of the histogram bucket that holds the ``q`` quantile
    of the observations ``counts`` (one count a bucket, the last one past
    every bound) describes: as precise as the buckets.  Past the last
    bound, the last bound.

    :return: ``None`` if nothing was observed.
    """
    total = sum(counts)
    if not total:
        return None
    wanted = q * total
    seen = 0
    for bound, count in zip(bounds, counts):
        seen += count
        if seen >= wanted:
            return bound
    return bounds[-1]


def _rate(now: float, before: float, seconds: float) -> float:
    return round((now - before) / seconds, 3)


def _rates(now: Mapping[str, int], before: Mapping[str, int], seconds: float) -> Dict[str, float]:
    """
    The rate of each label's count (a label appears once counted).
    """
    return {label: _rate(count, before.get(label, 0), seconds) for label, count in sorted(now.items())}


class Sampler:
    """
    Reads the hub's counters when :meth:`sample` is called (once a
    second), keeps the last ``window`` samples and tells its listeners.

    :param top: rooms listed in each ranking.
    """

    _log = Logger()

    def __init__(
        self, hub: Hub, clock: IReactorTime, window: int = WINDOW, top: int = TOP_ROOMS
    ) -> None:
        self._hub = hub
        self._clock = clock
        self._top = top
        self._samples: Deque[dict] = deque(maxlen=window)
        self._last: Optional[Reading] = None
        # The rooms' positions at the last ranking (None: no ranking then).
        self._positions: Optional[Dict[str, Tuple[str, int]]] = None
        self._positions_at = 0.0
        self._listeners: List[Listener] = []

    def samples(self) -> List[dict]:
        """
        The samples kept, oldest first.
        """
        return list(self._samples)

    def listen(self, listener: Listener) -> None:
        """
        Call ``listener(sample, rooms)`` with every sample from now on.
        It must not block; an exception it raises is logged, and the
        sampler goes on.
        """
        self._listeners.append(listener)

    def stop_listening(self, listener: Listener) -> None:
        self._listeners.remove(listener)
        if not self._listeners:
            # The next ranking starts afresh: rates over a gap would be
            # averages of minutes nobody watched.
            self._positions = None

    def sample(self) -> Optional[dict]:
        """
        Read the counters; from the second reading on, keep a sample of
        the rates since the one before and hand it to the listeners.

        :return: the sample, or ``None`` (the first reading, or no time
            has passed since the last).
        """
        hub = self._hub
        stats = hub.stats
        now = Reading.of(stats, self._clock.seconds())
        last, self._last = self._last, now
        if last is None or now.at <= last.at:
            return None
        seconds = now.at - last.at
        fanned = now.fan_out_count - last.fan_out_count
        buckets = [a - b for a, b in zip(now.fan_out_buckets, last.fan_out_buckets)]
        sample = {
            "t": now.at,
            "node": hub.node_id,
            "connections": {
                kind: stats.connected[kind] for kind in sorted(set(KINDS) | set(stats.connected))
            },
            "rooms": len(hub.rooms()),
            "messages_in": _rate(now.messages_in, last.messages_in, seconds),
            "deliveries": _rate(now.deliveries, last.deliveries, seconds),
            "bytes_out": _rate(now.bytes_out, last.bytes_out, seconds),
            "fan_out_mean": (now.fan_out_sum - last.fan_out_sum) / fanned if fanned else None,
            "fan_out_p95": quantile_bound(stats.fan_out_seconds.bounds, buckets, 0.95),
            "slow_consumers": _rate(now.slow_consumers, last.slow_consumers, seconds),
            "rate_limited": _rate(now.rate_limited, last.rate_limited, seconds),
            "refused": _rates(now.refused, last.refused, seconds),
            "refused_requests": _rates(now.refused_requests, last.refused_requests, seconds),
        }
        self._samples.append(sample)
        if self._listeners:
            rooms = self.rank_rooms(now.at)
            for listener in list(self._listeners):
                try:
                    listener(sample, rooms)
                except Exception:
                    # Raised into the timer, it would stop the sampling.
                    self._log.failure("dashboard listener {listener!r} failed", listener=listener)
        return sample

    def rank_rooms(self, at: float) -> dict:
        """
        The busiest rooms by members and by messages per second since the
        last ranking (see the module docstring).
        """
        roster = self._hub.roster
        positions = self._hub.positions()
        before, self._positions = self._positions, positions
        seconds = at - self._positions_at
        self._positions_at = at
        rates: Dict[str, float] = {}
        if before is not None and seconds > 0:
            for room, (epoch, seq) in positions.items():
                then = before.get(room)
                # A new epoch restarted the count: its rate is unknown.
                if then is not None and then[0] == epoch:
                    rates[room] = _rate(seq, then[1], seconds)

        def entry(room: str) -> dict:
            return {"room": room, "members": roster.count(room), "rate": rates.get(room)}

        seated = roster.rooms()
        by_members = heapq.nlargest(self._top, seated, key=roster.count)
        busy = [room for room, rate in rates.items() if rate > 0]
        by_rate = heapq.nlargest(self._top, busy, key=rates.__getitem__)
        return {
            "t": at,
            "count": len(seated),
            "by_members": [entry(room) for room in by_members],
            "by_rate": [entry(room) for room in by_rate],
        }
