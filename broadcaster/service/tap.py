"""
``twistd broadcaster``: the command-line options and ``makeService``.

This is the one place that reads configuration.  Everything it builds takes
its settings as arguments, so tests construct the same objects directly.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import txaio
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from broadcaster import __version__
from broadcaster.service import logs
from broadcaster.protocols.admission import Admission
from broadcaster.http.api import api_resource, read_key_file
from broadcaster.http.auth import Authenticator
from broadcaster.core.coercions import non_negative_float, non_negative_int, positive_float, positive_int
from broadcaster.http.fetch import ImageFetcher, fetch_client, url_problem
from broadcaster.core.flow import Limits
from broadcaster.core.hub import Hub
from broadcaster.core.imaging import DEFAULT_MAX_PIXELS
from broadcaster.protocols.images import DecoderPool, ImageFactory
from broadcaster.protocols.lines import LineBridgeFactory
from broadcaster.http.metrics import MetricsResource, metrics_for
from broadcaster.protocols.origin import OriginPolicy, parse_origin
from broadcaster.service.listening import (
    ReportingEndpoint,
    check_endpoint,
    raise_open_files_limit,
    with_backlog,
)
from broadcaster.service.signals import handle_stop_signals
from broadcaster.redis.address import parse_redis_url
from broadcaster.redis.backplane import HIREDIS, RedisBackplane, RedisBackplaneService
from broadcaster.http.site import BoundedSite, BroadcasterSite
from broadcaster.http.webhooks import WebhookService
from broadcaster.protocols.websocket import BroadcastServerFactory
from broadcaster.service.workers import (
    LISTENER_FLAGS,
    NO_REDIS,
    InheritedPortReactor,
    MasterService,
    MasterWatchService,
    find_redis_server,
    parse_worker_fds,
    sharing_problem,
)


class Options(usage.Options):
    """
    Options for ``twistd broadcaster``.
    """

    synopsis = "[options]"
    longdesc = (
        "Runs a chat/broadcast server: every WebSocket message is sent to every "
        "client.  The chat page and the WebSocket endpoint share --port: open "
        "http://localhost:9999/ in a browser or connect to ws://localhost:9999/."
    )

    optFlags = [
        [
            "no-metrics",
            None,
            "Do not serve Prometheus metrics at /metrics.",
        ],
        [
            "compression",
            None,
            "Accept permessage-deflate compression (off by default: it costs "
            "CPU per recipient).  Decompressed messages are still limited by "
            "--max-message-size.",
        ],
        [
            "debug",
            None,
            "Also log every message and HTTP request (sizes and peers, never "
            "payloads) and Autobahn's own protocol chatter.",
        ],
        [
            "allow-private-fetch",
            None,
            "Let image_url requests fetch from private, loopback, link-local "
            "and other non-public addresses (refused by default: clients could "
            "otherwise make the server reach into its own network).",
        ],
        [
            "anonymous-raw-ports",
            None,
            "With --auth-url, still open the image port and the line bridge: "
            "their clients cannot sign in, so they are anonymous members of "
            "the lobby.  Without this flag those ports stay off when "
            "--auth-url is set.",
        ],
    ]

    optParameters = [
        [
            "port",
            "p",
            "tcp:9999",
            "Where the WebSocket endpoint and chat page listen: a strports "
            "description such as tcp:9999, tcp:9999:interface=127.0.0.1, "
            "ssl:9443:privateKey=key.pem:certKey=cert.pem or unix:/run/chat.sock.",
        ],
        [
            "image-port",
            None,
            "tcp:9998",
            "Where the raw-TCP image protocol listens (4-byte big-endian "
            "length, then an image), or 'none'.",
        ],
        [
            "line-port",
            None,
            "tcp:9997",
            "Where the line bridge (one UTF-8 message per line, for nc and "
            "scripts) listens, or 'none'.",
        ],
        [
            "max-message-size",
            None,
            64 * 1024,
            "Largest WebSocket message (and frame) accepted, in bytes; larger "
            "ones close the connection with code 1009.",
            positive_int,
        ],
        [
            "open-handshake-timeout",
            None,
            10.0,
            "Seconds a client may take from connecting to the end of its HTTP "
            "request (its WebSocket handshake, or any other request; one "
            "deadline for the whole request, not an idle timer), and then to "
            "complete the WebSocket handshake (sign-in included).",
            positive_float,
        ],
        [
            "max-buffer",
            None,
            16 * 1024 * 1024,
            "Bytes that may wait for a client that reads slowly, whatever "
            "produced them (messages, replies, images); a write that would "
            "pass it closes the client as a slow consumer (code 4008).  At "
            "least --max-message-size and --max-image-size.",
            positive_int,
        ],
        [
            "rate",
            None,
            100.0,
            "Messages per second a client may send on average; excess "
            "messages are dropped, and a client that keeps flooding is closed "
            "(1008).  0 means no limit.",
            non_negative_float,
        ],
        [
            "burst",
            None,
            500,
            "Messages a client may send at once above --rate.",
            positive_int,
        ],
        [
            "listen-backlog",
            None,
            1024,
            "Connections the kernel may hold waiting to be accepted, for every "
            "tcp:, ssl: and unix: listener whose description sets no backlog= "
            "of its own.  Twisted's default of 50 makes clients retry (seconds "
            "late) when many reconnect at once, after a restart; the kernel caps "
            "it at net.core.somaxconn.",
            positive_int,
        ],
        [
            "max-connections",
            None,
            50000,
            "Connections at once on every port (WebSocket, HTTP requests, line "
            "bridge, image port), counted from accept; more are refused (HTTP "
            "503, or an error line or frame).  0 means no limit.",
            non_negative_int,
        ],
        [
            "max-connections-per-ip",
            None,
            0,
            "Connections at once from one IP address, on every port, counted "
            "like --max-connections.  0 (the default) means no limit: behind a "
            "reverse proxy every client has the proxy's address.",
            non_negative_int,
        ],
        [
            "ping-interval",
            None,
            25.0,
            "Seconds between keepalive pings to each WebSocket client "
            "(also keeps idle connections open through load balancers).  0 "
            "turns pings off.",
            non_negative_float,
        ],
        [
            "ping-timeout",
            None,
            10.0,
            "Seconds a client has to answer a ping before it is dropped as dead.",
            positive_float,
        ],
        [
            "max-image-size",
            None,
            16 * 1024 * 1024,
            "Largest image frame accepted on the image port, in bytes; a "
            "larger declared length is refused before anything is buffered.",
            positive_int,
        ],
        [
            "image-timeout",
            None,
            30.0,
            "Seconds an image frame may take from its first byte to its last.",
            positive_float,
        ],
        [
            "raw-idle-timeout",
            None,
            900.0,
            "Seconds a line-bridge or image-port client may send nothing before "
            "it is told so and disconnected (raw TCP has no keepalive ping).  0 "
            "means no limit.",
            non_negative_float,
        ],
        [
            "image-max-pixels",
            None,
            DEFAULT_MAX_PIXELS,
            "Largest image accepted, in pixels (width x height), checked "
            "before decoding: a guard against decompression bombs.",
            positive_int,
        ],
        [
            "image-threads",
            None,
            2,
            "Threads that decode images (at most this many at once).",
            positive_int,
        ],
        [
            "max-line-length",
            None,
            64 * 1024,
            "Longest line accepted on the line bridge, in bytes.",
            positive_int,
        ],
        [
            "metrics-port",
            None,
            None,
            "Serve /metrics on this endpoint of its own (e.g. "
            "tcp:9100:interface=127.0.0.1) instead of on --port.",
        ],
        [
            "log-format",
            None,
            "text",
            "text (twistd's usual lines) or json (one JSON object per event "
            "and line, for log shippers; written to --logfile or standard output).",
        ],
        [
            "batch-delay",
            None,
            None,
            "Seconds the fan-out waits to send events together (default: 0, "
            "the end of the current reactor turn; 0.003 with --redis when "
            "hiredis is not installed, as events then arrive one by one).  "
            "More throughput under bursts, that much more latency.",
            non_negative_float,
        ],
        [
            "history-size",
            None,
            100,
            "Text messages each room remembers, for history requests and "
            "recovery after a reconnect; 0 keeps none.",
            non_negative_int,
        ],
        [
            "max-rooms",
            None,
            10000,
            "Rooms whose history is remembered; beyond this the least recently "
            "used empty rooms are forgotten.",
            positive_int,
        ],
        [
            "max-rooms-per-client",
            None,
            100,
            "Rooms one client may be in at once.",
            positive_int,
        ],
        [
            "max-name-length",
            None,
            32,
            "Longest display name, in characters.",
            positive_int,
        ],
        [
            "drain-timeout",
            None,
            10.0,
            "On shutdown, seconds to wait for clients to close before dropping them.",
            positive_float,
        ],
        [
            "node-id",
            None,
            None,
            "Prefix of the client ids this server hands out (default: random). "
            "Must differ between servers sharing a backplane.",
        ],
        [
            "redis",
            None,
            None,
            "Share rooms, sequences, histories and presence with every other "
            "server using this Redis: redis://[[user]:password@]host[:port][/db] "
            "or unix:/path/to/redis.sock[?db=N].  Without it the server is on "
            "its own.",
        ],
        [
            "redis-namespace",
            None,
            "default",
            "Prefix of the Redis keys and channel, to keep apart deployments "
            "that share one Redis.",
        ],
        [
            "node-timeout",
            None,
            15.0,
            "With --redis: seconds after which a server that stopped "
            "heartbeating is declared dead and its clients announced as gone.",
            positive_float,
        ],
        [
            "webhook-secret",
            None,
            None,
            "Sign webhook POSTs: X-Broadcaster-Signature: sha256=<HMAC-SHA256 "
            "of the body with this secret>.",
        ],
        [
            "webhook-timeout",
            None,
            10.0,
            "Seconds a webhook receiver has to answer one POST.",
            positive_float,
        ],
        [
            "webhook-retry-for",
            None,
            300.0,
            "Seconds a failed webhook batch is retried (with backoff) before "
            "it is dropped; 0: never retried.",
            non_negative_float,
        ],
        [
            "webhook-queue",
            None,
            10000,
            "Events each webhook URL may have waiting; beyond it the oldest are dropped.",
            positive_int,
        ],
        [
            "auth-url",
            None,
            None,
            "Ask this HTTP(S) service about every WebSocket handshake (a JSON "
            "POST with the client's Authorization and Cookie headers): 2xx "
            "admits, 401/403 refuses (403), no usable answer refuses (503).",
        ],
        [
            "auth-timeout",
            None,
            5.0,
            "Seconds the --auth-url service has to answer.",
            positive_float,
        ],
        [
            "api-key-file",
            None,
            None,
            "A file of keys for POST /api/publish, one per line (read at "
            "start-up; blank lines and # comments skipped).",
        ],
        [
            "fetch-timeout",
            None,
            10.0,
            "Seconds an image_url download may take, redirects included.",
            positive_float,
        ],
        [
            "workers",
            None,
            1,
            "Run this many worker processes sharing the listening ports, "
            "joined through --redis or, without it, a private redis-server "
            "that the master process starts (see docs/workers.rst).  1: one process.",
            positive_int,
        ],
        [
            "worker-fds",
            None,
            None,
            "Internal to --workers: adopt these inherited listening sockets "
            "(port=3,image=4,...) instead of listening.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allow-origin"] = []
        self["webhook"] = []
        self["api-key"] = []

    def parseOptions(self, options=None) -> None:
        # Kept for --workers, which gives each worker the same options.
        self["args"] = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_webhook(self, url: str) -> None:
        """POST every chat event, in batches, to this http(s) URL (repeatable). See docs/webhooks.rst for the format and signature."""  # noqa: E501
        problem = url_problem(url, allow_credentials=True)
        if problem is not None:
            raise usage.UsageError("--webhook {!r}: {}".format(url, problem))
        self["webhook"].append(url)

    def opt_api_key(self, key: str) -> None:
        """Accept this key for POST /api/publish (Authorization: Bearer KEY; repeatable). Without any key the API is off."""  # noqa: E501
        if not key.strip() or key != key.strip():
            raise usage.UsageError("--api-key must be non-empty, without surrounding spaces")
        self["api-key"].append(key)

    def opt_allow_origin(self, origin: str) -> None:
        """Also accept browser handshakes from this Origin, e.g. https://chat.example.com (repeatable; '*' accepts every origin). By default only the server's own origin is accepted; clients that send no Origin (scripts) are always accepted."""  # noqa: E501
        if origin != "*" and parse_origin(origin) is None:
            raise usage.UsageError(
                "--allow-origin {!r} is not an origin: use scheme://host[:port], "
                "e.g. https://chat.example.com, or '*'".format(origin)
            )
        self["allow-origin"].append(origin)

    def postOptions(self) -> None:
        for _, flag in LISTENER_FLAGS:
            if self[flag] is None:
                continue
            if flag in ("image-port", "line-port") and self[flag].lower() == "none":
                self[flag] = None
                continue
            check_endpoint(flag, self[flag])
        #: The raw ports that --auth-url closed (their clients cannot sign in).
        self["closed-for-auth"] = []
        if self["auth-url"] is not None and not self["anonymous-raw-ports"]:
            for flag in ("image-port", "line-port"):
                if self[flag] is not None:
                    self["closed-for-auth"].append(flag)
                    self[flag] = None
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(
                "--log-format must be text or json, not {!r}".format(self["log-format"])
            )
        if self["log-format"] == "json":
            # twistd creates its log observer from its own --logger option
            # after parsing ours; point it at the JSON one.
            parent = getattr(self, "parent", None)
            if parent is not None:
                # As twistd does: standard output in the foreground,
                # twistd.log for a daemon, unless --logfile says otherwise.
                default = "-" if parent.get("nodaemon") else "twistd.log"
                logs.use_json(parent.get("logfile") or default)
                parent["logger"] = "broadcaster.service.logs.json_observer"
        if self["max-buffer"] < self["max-message-size"]:
            raise usage.UsageError(
                "--max-buffer {} is smaller than --max-message-size {}: a client "
                "could not be sent one message of the largest allowed size".format(
                    self["max-buffer"], self["max-message-size"]
                )
            )
        if self["max-buffer"] < self["max-image-size"]:
            raise usage.UsageError(
                "--max-buffer {} is smaller than --max-image-size {}: a client "
                "that keeps up could be cut as a slow consumer by the next message "
                "after one image of the largest allowed size".format(
                    self["max-buffer"], self["max-image-size"]
                )
            )
        node = self["node-id"]
        if node is not None and self["worker-fds"] is not None:
            # A worker of --workers: <the master's node id>-w<i>[.<restarts>].
            base, w, number = node.rpartition("-w")
            if w and number.replace(".", "", 1).isdigit():
                node = base
        if node is not None and (not node or not all(c.isalnum() or c in "_." for c in node)):
            raise usage.UsageError(
                "--node-id {!r} must be letters, digits, '_' or '.'".format(node)
            )
        if self["redis"] is not None:
            try:
                self["redis-address"] = parse_redis_url(self["redis"])
            except ValueError as e:
                raise usage.UsageError("--redis {!r}: {}".format(self["redis"], e))
        namespace = self["redis-namespace"]
        if not namespace or any(c.isspace() for c in namespace):
            raise usage.UsageError(
                "--redis-namespace {!r} must be non-empty, without spaces".format(namespace)
            )
        self._check_http_options()
        self._check_workers()
        # Last, so that every error above quotes the description as given.
        for _, flag in LISTENER_FLAGS:
            if self[flag] is not None:
                self[flag] = with_backlog(self[flag], self["listen-backlog"])

    def _check_http_options(self) -> None:
        """
        Validate --auth-url, --webhook-secret and --api-key-file, and read
        the keys (at start-up: the file may not be readable after twistd
        drops privileges).
        """
        if self["auth-url"] is not None:
            problem = url_problem(self["auth-url"], allow_credentials=True)
            if problem is not None:
                raise usage.UsageError("--auth-url {!r}: {}".format(self["auth-url"], problem))
            if self["auth-timeout"] >= self["open-handshake-timeout"]:
                raise usage.UsageError(
                    "--auth-timeout {:g} must be shorter than --open-handshake-timeout {:g}:"
                    " the handshake would time out first".format(
                        self["auth-timeout"], self["open-handshake-timeout"]
                    )
                )
        if self["webhook-secret"] is not None and not self["webhook-secret"]:
            raise usage.UsageError("--webhook-secret must not be empty")
        keys = list(self["api-key"])
        path = self["api-key-file"]
        if path is not None:
            try:
                from_file = read_key_file(path)
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError("--api-key-file {!r} cannot be read: {}".format(path, e))
            if not from_file:
                raise usage.UsageError("--api-key-file {!r} holds no keys".format(path))
            keys.extend(from_file)
        self["api-keys"] = keys

    def _check_workers(self) -> None:
        """
        Validate --workers (shareable ports; a Redis to join the workers)
        and the internal --worker-fds.
        """
        self["redis-server"] = None
        if self["worker-fds"] is not None:
            if self["workers"] > 1:
                raise usage.UsageError("--worker-fds is internal to --workers; give only --workers")
            try:
                self["worker-fds"] = parse_worker_fds(self["worker-fds"])
            except ValueError as e:
                raise usage.UsageError("--worker-fds {!r}: {}".format(self["worker-fds"], e))
            return
        if self["workers"] == 1:
            return
        for _, flag in LISTENER_FLAGS:
            if self[flag] is not None:
                problem = sharing_problem(self[flag])
                if problem is not None:
                    raise usage.UsageError("--{} {!r}: {}".format(flag, self[flag], problem))
        if self["redis"] is None:
            self["redis-server"] = find_redis_server()
            if self["redis-server"] is None:
                raise usage.UsageError(NO_REDIS)


class InOrder(MultiService):
    """
    A :class:`MultiService` whose order is its meaning: children start in
    the order they were added and stop one at a time in reverse, each once
    the one added after it has stopped.  (Twisted's stops them all at once.)
    """

    _log = Logger()

    def stopService(self) -> Deferred:
        if not self.running:
            return succeed(None)
        Service.stopService(self)
        d: Deferred = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, child=child: maybeDeferred(child.stopService))
            d.addErrback(
                lambda failure, child=child: self._log.failure(
                    "stopping {child!r} failed; stopping the rest", failure, child=child
                )
            )
        return d


class ClientsService(InOrder):
    """
    The listeners and the clients they let in.  Stopping it stops
    accepting, then closes every client politely (WebSocket 1001) and waits
    up to ``drain_timeout`` seconds for them to go before dropping the rest;
    then whatever the fan-out still holds goes out at once.

    :param hub: whose members are the clients.
    """

    _log = Logger()

    def __init__(self, hub: Hub, clock, drain_timeout: float) -> None:
        super().__init__()
        self.hub = hub
        self.clock = clock
        self.drain_timeout = drain_timeout

    def stopService(self) -> Deferred:
        if not self.running:
            return succeed(None)
        d = super().stopService()
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda _: self._deliver_at_once())
        return d

    def _deliver_at_once(self) -> None:
        """
        Deliver what the fan-out still holds (with --batch-delay, a few
        milliseconds' worth), and anything still arriving after the stop
        at once, rather than leave timers behind a stopped service.
        """
        self.hub.fanout.immediate = True
        self.hub.flush()

    def _drain(self) -> Deferred:
        members = self.hub.members()
        if not members:
            return succeed(None)
        self._log.info(
            "closing {count} connections (waiting up to {timeout:g} s)",
            count=len(members),
            timeout=self.drain_timeout,
        )
        gone = self.hub.when_empty()
        for member in members:
            member.shut_down()
        gone.addTimeout(self.drain_timeout, self.clock)

        def too_slow(failure):
            failure.trap(TimeoutError)
            remaining = self.hub.members()
            self._log.warn(
                "{count} connections did not close within {timeout:g} s; dropping them",
                count=len(remaining),
                timeout=self.drain_timeout,
            )
            for member in remaining:
                member.abort()

        return gone.addErrback(too_slow)


class BroadcasterService(InOrder):
    """
    The whole server, as children whose order is the start-up and the
    drain order (see :func:`makeService`): the backplane, the services the
    protocols lean on (image decoding, fetching, sign-in), the webhooks,
    and last the clients.  Stopping it (twistd does on SIGTERM and SIGINT,
    and waits) closes the clients, then flushes the webhooks (so their
    last batches hold the clients' departures), then stops the helpers,
    and last leaves the backplane.

    :ivar hub: the broadcast domain, shared by every protocol.
    :ivar limits: the per-client :class:`~broadcaster.core.flow.Limits`.
    :ivar admission: the one :class:`~broadcaster.protocols.admission.Admission`
        of every listener.
    :ivar clients: the :class:`ClientsService` (listeners, drain).
    :ivar websocket_factory: the WebSocket protocol factory.
    :ivar web_endpoint: the main port's :class:`ReportingEndpoint`;
        ``image_endpoint``, ``line_endpoint`` and ``metrics_endpoint`` those
        of the other ports (``None`` when off).
    :ivar fetcher: the ``image_url`` fetcher; ``authenticator`` and
        ``webhooks`` the ``--auth-url`` and ``--webhook`` services, or ``None``.
    :ivar metrics: the Prometheus metrics, or ``None`` with ``--no-metrics``.
    """

    _log = Logger()

    limits = None
    admission = None
    websocket_factory = None
    web_endpoint = None
    image_endpoint = None
    line_endpoint = None
    metrics_endpoint = None
    fetcher = None
    authenticator = None
    webhooks = None
    metrics = None

    def __init__(self, clock, hub: Hub, drain_timeout: float) -> None:
        super().__init__()
        self.clock = clock
        self.hub = hub
        self.clients = ClientsService(hub, clock, drain_timeout)

    def privilegedStartService(self) -> None:
        # twistd binds ports here, before dropping privileges: say who we are first.
        self._log.info("broadcaster {version} starting", version=__version__)
        raise_open_files_limit(self._log)
        super().privilegedStartService()

    #: Whether SIGTERM and SIGINT are ours to handle (see :meth:`startService`).
    handle_signals = False

    def startService(self) -> None:
        super().startService()
        if self.handle_signals:
            # After the reactor has installed its own handlers, which
            # happens as it starts running, after services have started.
            self.clock.callWhenRunning(self._handle_stop_signals)

    def _handle_stop_signals(self) -> None:
        handle_stop_signals(self.clock, self._log, "shutting down gracefully")


def makeService(options: Options, reactor=None) -> "BroadcasterService | MasterService":
    """
    Build the server from parsed options (with ``--workers N``, the master
    process that runs N servers).

    :param reactor: the reactor to listen with and to take time from
        (default: the global one).
    """
    handle_signals = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    if options["workers"] > 1:
        return _master(options, reactor, handle_signals)
    # With --worker-fds (a worker of --workers): the inherited sockets.
    fds = options["worker-fds"] or {}

    # Autobahn logs each refused handshake and dropped connection itself, at
    # info and warn; ours say the same with the client's id, so keep its
    # chatter for --debug.
    txaio.set_global_log_level("debug" if options["debug"] else "error")

    backplane = None
    if options["redis"] is not None:
        backplane = RedisBackplane(
            options.get("redis-address") or parse_redis_url(options["redis"]),
            namespace=options["redis-namespace"],
            history_size=options["history-size"],
            node_timeout=options["node-timeout"],
            clock=reactor,
        )
    hub = Hub(
        reactor,
        node_id=options["node-id"],
        history_size=options["history-size"],
        max_rooms=options["max-rooms"],
        max_rooms_per_member=options["max-rooms-per-client"],
        backplane=backplane,
    )
    service = BroadcasterService(reactor, hub, options["drain-timeout"])
    # Only as twistd runs us (on the global reactor): a test process that
    # builds servers on a reactor of its choosing keeps its own handlers.
    service.handle_signals = handle_signals
    for flag in options.get("closed-for-auth", ()):
        service._log.warn(
            "[CONFIG] --{flag} is off: with --auth-url every client must sign in, and"
            " raw-TCP clients cannot (--anonymous-raw-ports opens it to anonymous clients)",
            flag=flag,
        )

    # First in, last out: the backplane.  Start-up does not wait for Redis;
    # until it answers, this server serves its own clients.
    if backplane is not None:
        RedisBackplaneService(backplane, reactor).setServiceParent(service)
        if not HIREDIS:
            # Without hiredis, events from Redis reach the hub one reactor
            # turn apart; without a short wait each would go out on its own
            # (a send per client per message).
            hub.fanout.batch_delay = 0.003
    if options["batch-delay"] is not None:
        hub.fanout.batch_delay = options["batch-delay"]
    registry = None
    if not options["no-metrics"]:
        registry, service.metrics = metrics_for(hub)

    # Then what the protocols lean on.
    helpers = MultiService()
    helpers.setServiceParent(service)
    if fds and handle_signals:
        # A worker's standard input ends when its master does.
        MasterWatchService(reactor).setServiceParent(helpers)
    # Images are decoded in threads, for the image port and image_url alike.
    decoder = DecoderPool(
        reactor,
        options["image-threads"],
        options["image-max-pixels"],
        max_png_size=options["max-image-size"],
    )
    decoder.setServiceParent(helpers)
    service.fetcher = _image_fetcher(options, decoder, service.metrics, reactor)
    service.fetcher.setServiceParent(helpers)
    service.authenticator = _authenticator(options, reactor)
    if service.authenticator is not None:
        service.authenticator.setServiceParent(helpers)

    # Then the webhooks: stopped once the clients are gone, so that what
    # they flush holds the clients' departures.
    service.webhooks = _webhooks(options, hub, service.metrics, reactor)
    if service.webhooks is not None:
        service.webhooks.setServiceParent(service)

    # Last in, first out: the listeners and their clients.
    service.clients.setServiceParent(service)
    _clients(service, options, decoder, registry, reactor, fds)
    return service


def _clients(
    service: BroadcasterService, options: Options, decoder: DecoderPool, registry, reactor, fds
) -> None:
    """
    The listeners, each admitting its connections through the one admission
    policy, as children of ``service.clients``.
    """
    hub = service.hub
    clients = service.clients
    limits = service.limits = Limits(
        max_buffer=options["max-buffer"],
        rate=options["rate"],
        burst=options["burst"],
        max_message_size=options["max-message-size"],
        max_connections=options["max-connections"],
        max_connections_per_ip=options["max-connections-per-ip"],
        ping_interval=options["ping-interval"],
        ping_timeout=options["ping-timeout"],
        open_handshake_timeout=options["open-handshake-timeout"],
        compression=bool(options["compression"]),
        raw_idle_timeout=options["raw-idle-timeout"],
    )
    # Every listener's connections count under the same limits, from accept.
    admission = service.admission = Admission(
        options["max-connections"], options["max-connections-per-ip"], hub.stats
    )
    factory = service.websocket_factory = BroadcastServerFactory(
        hub,
        OriginPolicy(options["allow-origin"]),
        reactor,
        limits=limits,
        debug=options["debug"],
        max_name_length=options["max-name-length"],
        fetcher=service.fetcher,
        authenticator=service.authenticator,
    )
    metrics = MetricsResource(registry) if registry is not None else None
    keys = options.get("api-keys", options["api-key"])
    api = api_resource(hub, keys, options["max-message-size"]) if keys else None
    service.web_endpoint = _listen(
        clients,
        options["port"],
        BroadcasterSite(
            factory,
            debug=options["debug"],
            metrics=metrics if options["metrics-port"] is None else None,
            api=api,
            admission=admission,
            api_body_limit=options["max-message-size"],
        ),
        "WebSocket endpoint and chat page",
        reactor,
        fds.get("port"),
    )
    if metrics is not None and options["metrics-port"] is not None:
        service.metrics_endpoint = _listen(
            clients,
            options["metrics-port"],
            BoundedSite(
                metrics,
                reactor,
                hub.stats,
                options["open-handshake-timeout"],
                admission,
                "metrics port",
            ),
            "Metrics",
            reactor,
            fds.get("metrics"),
        )
    if options["image-port"] is not None:
        images = ImageFactory(
            hub,
            reactor,
            decoder.decode,
            limits=limits,
            max_image_size=options["max-image-size"],
            image_timeout=options["image-timeout"],
            admission=admission,
        )
        service.image_endpoint = _listen(
            clients, options["image-port"], images, "Image protocol", reactor, fds.get("image")
        )
    if options["line-port"] is not None:
        lines = LineBridgeFactory(hub, reactor, options["max-line-length"], limits, admission)
        service.line_endpoint = _listen(
            clients, options["line-port"], lines, "Line bridge", reactor, fds.get("line")
        )


def _master(options: Options, reactor, handle_signals: bool) -> MasterService:
    """
    The master process of ``--workers N`` (see :mod:`broadcaster.service.workers`):
    it binds the ports the workers accept on and serves nobody itself.
    """
    listeners = [("port", options["port"], "WebSocket endpoint and chat page")]
    if options["image-port"] is not None:
        listeners.append(("image", options["image-port"], "Image protocol"))
    if options["line-port"] is not None:
        listeners.append(("line", options["line-port"], "Line bridge"))
    if not options["no-metrics"] and options["metrics-port"] is not None:
        listeners.append(("metrics", options["metrics-port"], "Metrics"))
    # A worker drains for up to --drain-timeout, flushes its webhooks for up
    # to as long again, then says goodbye to Redis.
    drain = options["drain-timeout"] * (2 if options["webhook"] else 1)
    master = MasterService(
        reactor,
        options["workers"],
        listeners,
        options.get("args", []),
        node_id=options["node-id"] or os.urandom(3).hex(),
        stop_timeout=drain + WORKER_STOP_MARGIN,
        redis_server=options.get("redis-server"),
    )
    master.handle_signals = handle_signals
    return master


#: Seconds a --workers master gives its workers beyond their drain (and
#: webhook flush) before killing them.
WORKER_STOP_MARGIN = 5.0


def _image_fetcher(options: Options, decoder: DecoderPool, metrics, reactor) -> ImageFetcher:
    """
    The ``image_url`` fetcher, with a treq client of its own.
    """
    fetcher = ImageFetcher(
        fetch_client(reactor, allow_private=bool(options["allow-private-fetch"])),
        reactor,
        decoder.decode,
        max_size=options["max-image-size"],
        timeout=options["fetch-timeout"],
    )
    if metrics is not None:
        fetcher.register_metrics(metrics)
    return fetcher


def _authenticator(options: Options, reactor) -> Optional[Authenticator]:
    """
    The ``--auth-url`` client, or ``None``.
    """
    if options["auth-url"] is None:
        return None
    # A new connection per handshake: a kept-alive one the service has
    # just timed out would fail a POST (not retried) and refuse a user.
    agent = Agent(reactor, connectTimeout=options["auth-timeout"])
    return Authenticator(
        options["auth-url"],
        HTTPClient(agent),
        reactor,
        timeout=options["auth-timeout"],
        max_name_length=options["max-name-length"],
    )


def _webhooks(options: Options, hub: Hub, metrics, reactor) -> Optional[WebhookService]:
    """
    The ``--webhook`` poster, or ``None``.
    """
    if not options["webhook"]:
        return None
    pool = HTTPConnectionPool(reactor, persistent=True)
    secret = options["webhook-secret"]
    webhooks = WebhookService(
        hub,
        options["webhook"],
        HTTPClient(Agent(reactor, connectTimeout=options["webhook-timeout"], pool=pool)),
        reactor,
        secret=secret.encode("utf-8") if secret is not None else None,
        timeout=options["webhook-timeout"],
        retry_for=options["webhook-retry-for"],
        max_queue=options["webhook-queue"],
        # The last attempt at shutdown, once the clients are gone.
        flush_timeout=min(options["webhook-timeout"], options["drain-timeout"]),
        pool=pool,
    )
    if metrics is not None:
        webhooks.register_metrics(metrics)
    return webhooks


def _listen(
    parent, description: str, factory, what: str, reactor, fd: Optional[int] = None
) -> ReportingEndpoint:
    """
    Add a child service listening on ``description``; return its endpoint.

    :param fd: an inherited listening socket to adopt instead of listening
        (a worker of ``--workers``); ``description`` still says how to serve
        it (``ssl:`` and its certificate).
    """
    if fd is not None:
        reactor = InheritedPortReactor(reactor, fd)
    listener = strports.service(description, factory, reactor=reactor)
    listener.endpoint = endpoint = ReportingEndpoint(listener.endpoint, what)
    listener.setServiceParent(parent)
    return endpoint
