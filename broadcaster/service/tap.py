"""
``twistd broadcaster``: ``makeService`` composes the server from its
options (:mod:`broadcaster.service.options`, re-exported here as the
plugin expects both in one module).

This is the one place that reads configuration.  Everything it builds takes
its settings as arguments, so tests construct the same objects directly.
"""

from __future__ import annotations

import gc
import os
from typing import Optional

import txaio
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from broadcaster import __version__
from broadcaster.protocols.admission import Admission
from broadcaster.http.admin import Dashboard
from broadcaster.http.api import api_resource
from broadcaster.http.auth import Authenticator
from broadcaster.http.tokens import JWKS, EitherAuthenticator, TokenAuthenticator
from broadcaster.http.fetch import ImageFetcher, fetch_client
from broadcaster.core.fetching import describe_url
from broadcaster.core.flow import Limits
from broadcaster.core.hub import Hub
from broadcaster.core.permissions import EVERYTHING
from broadcaster.protocols.images import DecoderPool, ImageFactory
from broadcaster.protocols.lines import LineBridgeFactory
from broadcaster.http.metrics import MetricsResource, metrics_for
from broadcaster.protocols.origin import HostPolicy, OriginPolicy
from broadcaster.service.listening import ReportingEndpoint, loopback_only, raise_open_files_limit
from broadcaster.service.options import Options
from broadcaster.service.signals import handle_stop_signals
from broadcaster.redis.address import parse_redis_url
from broadcaster.redis.backplane import RedisBackplane, RedisBackplaneService
from broadcaster.redis.cluster import ClusterConnections
from broadcaster.redis.connections import RedisConnections
from broadcaster.redis.shards import sharded
from broadcaster.http.site import BoundedSite, BroadcasterSite
from broadcaster.http.webhooks import WebhookService
from broadcaster.protocols.websocket import BroadcastServerFactory
from broadcaster.service.workers import InheritedPortReactor, MasterService, MasterWatchService


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
        ``webhooks`` the sign-in (``--auth-url``, ``--jwt-*``) and
        ``--webhook`` services, or ``None``.
    :ivar metrics: the Prometheus metrics, or ``None`` with ``--no-metrics``.
    :ivar dashboard: the operator :class:`~broadcaster.http.admin.Dashboard`,
        or ``None`` (no API key, or ``--no-admin``).
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
    dashboard = None

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
            # What start-up made (modules, classes, the services) lives as
            # long as the process: the collector need not look at it again.
            # Its full collections then cost half as much, which is 6 to 8%
            # of the CPU of 10,000 connections arriving at once (measured;
            # bench S8).  Only as twistd runs us: a test process keeps its
            # collector as it is.
            self.clock.callWhenRunning(gc.freeze)

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
        master = _master(options, reactor, handle_signals)
        _warn_of_secrets(master._log, options)
        return master
    # With --worker-fds (a worker of --workers): the inherited sockets.
    fds = options["worker-fds"] or {}

    # Autobahn logs each refused handshake and dropped connection itself, at
    # info and warn; ours say the same with the client's id, so keep its
    # chatter for --debug.
    txaio.set_global_log_level("debug" if options["debug"] else "error")

    backplane = None
    if options["redis"] is not None:
        addresses = options.get("redis-addresses") or [parse_redis_url(options["redis"])]

        def redis_backplane(address, shard=None):
            return RedisBackplane(
                address,
                namespace=options["redis-namespace"],
                history_size=options["history-size"],
                node_timeout=options["node-timeout"],
                room_ttl=options["room-ttl"],
                room_grace=options["room-grace"],
                clock=reactor,
                connections=(
                    ClusterConnections(address, reactor)
                    if address.cluster
                    else RedisConnections(address, reactor)
                ),
                history_memory=options["history-memory"],
                shard=shard,
            )

        if len(addresses) == 1:
            backplane = redis_backplane(addresses[0])
        else:
            backplane = sharded(addresses, redis_backplane, reactor, options["history-memory"])
    hub = Hub(
        reactor,
        node_id=options["node-id"],
        history_size=options["history-size"],
        max_rooms=options["max-rooms"],
        max_rooms_per_member=options["max-rooms-per-client"],
        backplane=backplane,
        history_memory=options["history-memory"],
    )
    service = BroadcasterService(reactor, hub, options["drain-timeout"])
    # Only as twistd runs us (on the global reactor): a test process that
    # builds servers on a reactor of its choosing keeps its own handlers.
    service.handle_signals = handle_signals
    _warn_of_secrets(service._log, options)
    for flag in options.get("closed-for-auth", ()):
        service._log.warn(
            "[CONFIG] --{flag} is off: with --auth-url or --jwt-* every client must sign"
            " in, and raw-TCP clients cannot (--anonymous-raw-ports opens it to anonymous"
            " clients)",
            flag=flag,
        )
    jwks_url = options["jwt-jwks-url"]
    if jwks_url is not None and jwks_url.lower().startswith("http:"):
        service._log.warn(
            "[CONFIG] --jwt-jwks-url {url} is plain http: whoever can tamper with the"
            " traffic can hand the server keys of their own; prefer https",
            url=describe_url(jwks_url),
        )

    # First in, last out: the backplane.  Start-up does not wait for Redis;
    # until it answers, this server serves its own clients.
    if backplane is not None:
        RedisBackplaneService(backplane, reactor).setServiceParent(service)
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
        formats=options["image-formats"],
        max_pending=options["max-pending-images"],
        memory=options["image-decode-memory"],
    )
    decoder.setServiceParent(helpers)
    if service.metrics is not None:
        decoder.register_metrics(service.metrics)
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
        max_image_size=options["max-image-size"],
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
        decode=decoder.decode,
        authenticator=service.authenticator,
        anonymous=options.get("anonymous-grants", EVERYTHING),
        token_refresh_window=options["token-refresh-window"],
        token_leeway=options["jwt-leeway"],
    )
    hosts = _host_policy(service._log, options)
    metrics = MetricsResource(registry) if registry is not None else None
    keys = options.get("api-keys", options["api-key"]) or []
    # Signed tokens may publish too, within their rooms.
    tokens = service.authenticator if options.get("jwt-keys") or options.get("jwt-jwks-url") else None
    api = (
        api_resource(
            hub, keys, options["max-message-size"], factory.history_reply_size, tokens=tokens
        )
        if keys or tokens is not None
        else None
    )
    service.dashboard = _dashboard(service._log, options, hub, keys, limits, reactor)
    if service.dashboard is not None:
        # Before the listeners: it stops once they no longer accept.
        service.dashboard.setServiceParent(clients)
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
            hosts=hosts,
            admin=service.dashboard.resource if service.dashboard is not None else None,
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
                # The names of --allow-host are the chat's, not the scraper's.
                HostPolicy(loopback=loopback_only(options["metrics-port"])),
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
            anonymous=options.get("anonymous-grants", EVERYTHING),
            authenticator=service.authenticator,
        )
        service.image_endpoint = _listen(
            clients, options["image-port"], images, "Image protocol", reactor, fds.get("image")
        )
    if options["line-port"] is not None:
        lines = LineBridgeFactory(
            hub,
            reactor,
            options["max-line-length"],
            limits,
            admission,
            anonymous=options.get("anonymous-grants", EVERYTHING),
            authenticator=service.authenticator,
        )
        service.line_endpoint = _listen(
            clients, options["line-port"], lines, "Line bridge", reactor, fds.get("line")
        )


def _dashboard(log: Logger, options: Options, hub: Hub, keys, limits: Limits, reactor):
    """
    The operator dashboard, or ``None``: it needs an API key to sign
    operators in with, and ``--no-admin`` turns it off.
    """
    if options["no-admin"]:
        log.info("[CONFIG] the operator dashboard (/admin) is off: --no-admin")
        return None
    if not keys:
        log.info(
            "[CONFIG] the operator dashboard (/admin) is off: it needs an --api-key-file"
            " to sign operators in"
        )
        return None
    log.info("[CONFIG] the operator dashboard is at /admin, for holders of an API key")
    return Dashboard(hub, keys, reactor, limits.max_buffer)


def _host_policy(log: Logger, options: Options) -> HostPolicy:
    """
    The host names the main port answers to (see
    :class:`~broadcaster.protocols.origin.HostPolicy`), said in the log.
    """
    hosts = HostPolicy(options["allow-host"], loopback=loopback_only(options["port"]))
    if hosts.open:
        log.info(
            "[CONFIG] --port answers to any Host name: it listens beyond loopback"
            " without --allow-host (set it in production, against DNS rebinding)"
        )
    else:
        names = list(options["allow-host"])
        if hosts.loopback:
            names.append("localhost, *.localhost and loopback addresses")
        log.info(
            "[CONFIG] --port answers only to the host names {names}; others get 403",
            names=", ".join(names),
        )
    return hosts


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
        options["worker-args"],
        node_id=options["node-id"] or os.urandom(3).hex(),
        stop_timeout=drain + WORKER_STOP_MARGIN,
        redis_server=options.get("redis-server"),
        worker_env=options["worker-env"],
    )
    master.handle_signals = handle_signals
    return master


def _warn_of_secrets(log: Logger, options: Options) -> None:
    """
    Warn of each secret given on the command line, naming the flag and
    what to use instead (never the secret).
    """
    for flag, alternative in options.get("secrets-on-command-line", ()):
        log.warn(
            "[CONFIG] {flag} puts a secret on the command line, where every local user"
            " can read it (ps, /proc/<pid>/cmdline); use {alternative} instead",
            flag=flag,
            alternative=alternative,
        )


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


def _authenticator(options: Options, reactor):
    """
    What signs clients in: the ``--auth-url`` client, the ``--jwt-*`` token
    checker, both (a token wins: see :mod:`broadcaster.http.tokens`), or
    ``None``.
    """
    service = tokens = None
    if options["auth-url"] is not None:
        # A new connection per handshake: a kept-alive one the service has
        # just timed out would fail a POST (not retried) and refuse a user.
        agent = Agent(reactor, connectTimeout=options["auth-timeout"])
        service = Authenticator(
            options["auth-url"],
            HTTPClient(agent),
            reactor,
            timeout=options["auth-timeout"],
            max_name_length=options["max-name-length"],
        )
    jwks = None
    if options["jwt-jwks-url"] is not None:
        # Fetched rarely: no connection is worth keeping.
        jwks = JWKS(
            options["jwt-jwks-url"],
            HTTPClient(Agent(reactor, connectTimeout=options["jwt-jwks-timeout"])),
            reactor,
            timeout=options["jwt-jwks-timeout"],
            refresh_interval=options["jwt-jwks-refresh"],
            min_interval=options["jwt-jwks-min-interval"],
        )
    # Read by postOptions: options built but never parsed have none.
    keys = options.get("jwt-keys", [])
    if keys or jwks is not None:
        tokens = TokenAuthenticator(
            keys,
            reactor,
            jwks=jwks,
            audience=options["jwt-audience"],
            issuer=options["jwt-issuer"],
            require_exp=not options["jwt-allow-no-exp"],
            leeway=options["jwt-leeway"],
            max_name_length=options["max-name-length"],
        )
    if tokens is not None and service is not None:
        return EitherAuthenticator(tokens, service)
    return tokens if tokens is not None else service


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
        max_queue_bytes=options["webhook-queue-bytes"],
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
