"""
Plain counters of what the server does, for ``/metrics`` and the
operator dashboard.

They are ordinary integers bumped on the hot path (a ``+= 1`` costs next to
nothing); :mod:`broadcaster.http.metrics` turns them into Prometheus metrics
only when somebody scrapes, and :mod:`broadcaster.core.sampling` into
per-second rates for the dashboard.  This module imports nothing, so the
hub and the protocols can count without knowing about Prometheus.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import List, Sequence

#: The client kinds, so that every series exists (at 0) from the start.
KINDS = ("plain", "json", "line", "image", "sse")

#: Upper bounds, in seconds, of the fan-out latency histogram's buckets.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Histogram:
    """
    A fixed-bucket histogram: counts per bucket, a total count and a sum.
    """

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts: List[int] = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self):
        """
        ``[(upper bound as text, cumulative count), ...]`` ending with ``+Inf``.
        """
        total = 0
        buckets = []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return buckets


class Stats:
    """
    Everything counted, in one object shared by the hub and every protocol.

    Keys of the ``Counter`` fields are label values: a client kind
    (``plain``, ``json``, ``line``, ``image``) or a refusal reason.
    """

    def __init__(self) -> None:
        #: Clients connected now, by kind: kept by the hub as members
        #: connect and go, so that reading it costs nothing however many
        #: there are.
        self.connected: Counter = Counter()
        self.messages_in: Counter = Counter()
        self.bytes_in: Counter = Counter()
        self.frames_out = 0
        self.bytes_out = 0
        self.deliveries = 0
        self.refused_handshakes: Counter = Counter()
        #: HTTP requests refused before they were read, by status code.
        self.refused_requests: Counter = Counter()
        self.slow_consumers = 0
        self.rate_limited = 0
        #: Requests refused because the member's grants do not allow them.
        self.forbidden = 0
        self.bad_input: Counter = Counter()
        self.image_decode_errors = 0
        self.fan_out_seconds = Histogram()

    def received(self, kind: str, size: int) -> None:
        """
        Count one message of ``size`` bytes from a ``kind`` client.
        """
        self.messages_in[kind] += 1
        self.bytes_in[kind] += size
