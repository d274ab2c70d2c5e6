"""
``GET /metrics``: the server's counters in the Prometheus text format.

Counting happens in :class:`broadcaster.core.stats.Stats` with plain integers;
this module reads them only when Prometheus scrapes, through a custom
``prometheus_client`` collector on a registry of the server's own (not the
process-wide default one, so that several servers in one process, as in the
tests, each report their own).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.web.resource import Resource
from twisted.web.server import Request

from broadcaster.core.hub import Hub
from broadcaster.core.stats import KINDS


def _by_label(name: str, documentation: str, label: str, values: Dict[str, int], keys=()):
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key in sorted(set(keys) | set(values)):
        family.add_metric([key], values.get(key, 0))
    return family


class StatsCollector:
    """
    Turns the hub's :class:`~broadcaster.core.stats.Stats` (and whatever else is
    registered with :meth:`add_gauge`) into metric families at scrape time.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._gauges: Dict[str, tuple] = {}

    def add_gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """
        Also report ``read()`` as the gauge ``name`` (e.g. a webhook queue length).
        """
        self._gauges[name] = (documentation, read)

    def collect(self) -> Iterator:
        hub = self._hub
        stats = hub.stats
        connections = GaugeMetricFamily(
            "broadcaster_connections", "Clients connected now, by kind.", labels=["kind"]
        )
        for kind in sorted(set(KINDS) | set(stats.connected)):
            connections.add_metric([kind], stats.connected[kind])
        yield connections
        yield GaugeMetricFamily("broadcaster_rooms", "Rooms somebody is in.", value=len(hub.rooms()))
        yield _by_label(
            "broadcaster_messages_received",
            "Messages received from clients, by client kind.",
            "kind",
            stats.messages_in,
            KINDS,
        )
        yield _by_label(
            "broadcaster_received_bytes",
            "Bytes of message payload received from clients, by client kind.",
            "kind",
            stats.bytes_in,
            KINDS,
        )
        yield CounterMetricFamily(
            "broadcaster_frames_sent", "Frames (or lines) written to clients.", value=stats.frames_out
        )
        yield CounterMetricFamily(
            "broadcaster_sent_bytes", "Bytes written to clients.", value=stats.bytes_out
        )
        yield CounterMetricFamily(
            "broadcaster_deliveries",
            "Events handed to clients by the fan-out (one per recipient).",
            value=stats.deliveries,
        )
        yield _by_label(
            "broadcaster_refused_handshakes",
            "WebSocket handshakes refused, by reason.",
            "reason",
            stats.refused_handshakes,
            ("origin", "name", "since", "max_connections", "max_connections_per_ip"),
        )
        yield _by_label(
            "broadcaster_refused_requests",
            "HTTP requests refused before they were read, by status code (403: a"
            " Host not allowed; 408, 413, ...).",
            "code",
            {str(code): count for code, count in stats.refused_requests.items()},
        )
        yield CounterMetricFamily(
            "broadcaster_slow_consumer_disconnects",
            "Clients closed for falling more than --max-buffer behind.",
            value=stats.slow_consumers,
        )
        yield CounterMetricFamily(
            "broadcaster_rate_limited_messages",
            "Messages dropped for exceeding --rate.",
            value=stats.rate_limited,
        )
        yield CounterMetricFamily(
            "broadcaster_forbidden_requests",
            "Requests refused because the client's rooms do not allow them.",
            value=stats.forbidden,
        )
        yield _by_label(
            "broadcaster_bad_input",
            "Client input refused with an error, by client kind.",
            "kind",
            stats.bad_input,
            KINDS,
        )
        yield CounterMetricFamily(
            "broadcaster_image_decode_errors",
            "Image frames that could not be decoded or were refused.",
            value=stats.image_decode_errors,
        )
        backplane = hub.backplane.state()
        connected = GaugeMetricFamily(
            "broadcaster_backplane_connected",
            "1 while the backplane (local, or Redis) is usable, else 0.",
            labels=["kind"],
        )
        connected.add_metric([backplane.get("kind", "local")], 1 if backplane.get("connected") else 0)
        yield connected
        servers = backplane.get("shards") or ([backplane] if "url" in backplane else [])
        if servers:
            reachable = GaugeMetricFamily(
                "broadcaster_redis_connected",
                "1 while this --redis server is usable, else 0 (its rooms are then"
                " served on this node only), by server URL without password.",
                labels=["server"],
            )
            for server in servers:
                reachable.add_metric([server["url"]], 1 if server["connected"] else 0)
            yield reachable
        yield GaugeMetricFamily(
            "broadcaster_backplane_nodes",
            "Nodes sharing the backplane, this one included.",
            value=backplane.get("nodes", 1),
        )
        memory = hub.backplane.memory
        yield GaugeMetricFamily(
            "broadcaster_history_bytes",
            "Bytes of room history kept in this process (with --redis, only while"
            " Redis is unreachable), bounded by --history-memory.",
            value=memory.used,
        )
        yield CounterMetricFamily(
            "broadcaster_history_evicted_messages",
            "Messages evicted from room histories to stay within --history-memory.",
            value=memory.evicted,
        )
        histogram = stats.fan_out_seconds
        yield HistogramMetricFamily(
            "broadcaster_fan_out_seconds",
            "Time to hand one event to all its recipients.",
            buckets=histogram.cumulative(),
            sum_value=histogram.sum,
        )
        for name, (documentation, read) in self._gauges.items():
            yield GaugeMetricFamily(name, documentation, value=read())


class MetricsResource(Resource):
    """
    Serves a registry in the Prometheus text format.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self._registry)


def metrics_for(hub: Hub) -> tuple:
    """
    :return: ``(registry, collector)`` reporting ``hub``'s statistics.
    """
    registry = CollectorRegistry(auto_describe=False)
    collector = StatsCollector(hub)
    registry.register(collector)
    return registry, collector
