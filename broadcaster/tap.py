"""
``twistd broadcaster``: the command-line options and ``makeService``.

This is the one place that reads configuration.  Everything it builds takes
its settings as arguments, so tests construct the same objects directly.
"""

from __future__ import annotations

from typing import List, Optional

import txaio
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site
from zope.interface import implementer

from broadcaster import __version__, logs
from broadcaster.coercions import non_negative_float, non_negative_int, positive_float, positive_int
from broadcaster.flow import Limits
from broadcaster.hub import Hub
from broadcaster.imaging import DEFAULT_MAX_PIXELS
from broadcaster.images import DecoderPool, ImageFactory
from broadcaster.lines import LineBridgeFactory
from broadcaster.metrics import MetricsResource, metrics_for
from broadcaster.origin import OriginPolicy, parse_origin
from broadcaster.web import BroadcasterSite
from broadcaster.websocket import BroadcastServerFactory


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
            "Seconds a client may take to complete the WebSocket handshake.",
            positive_float,
        ],
        [
            "max-buffer",
            None,
            1024 * 1024,
            "Bytes a client may fall behind (queued for it because it reads "
            "slowly) before it is closed as a slow consumer (code 4008).  At "
            "least --max-message-size.",
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
            "max-connections",
            None,
            50000,
            "WebSocket connections at once; more are answered 503.  0 means no limit.",
            non_negative_int,
        ],
        [
            "max-connections-per-ip",
            None,
            0,
            "WebSocket connections at once from one IP address; more are "
            "answered 503.  0 (the default) means no limit: behind a reverse "
            "proxy every client has the proxy's address.",
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allow-origin"] = []

    def opt_allow_origin(self, origin: str) -> None:
        """Also accept browser handshakes from this Origin, e.g. https://chat.example.com (repeatable; '*' accepts every origin). By default only the server's own origin is accepted; clients that send no Origin (scripts) are always accepted."""  # noqa: E501
        if origin != "*" and parse_origin(origin) is None:
            raise usage.UsageError(
                "--allow-origin {!r} is not an origin: use scheme://host[:port], "
                "e.g. https://chat.example.com, or '*'".format(origin)
            )
        self["allow-origin"].append(origin)

    def postOptions(self) -> None:
        _check_endpoint("port", self["port"])
        for flag in ("image-port", "line-port"):
            if self[flag].lower() == "none":
                self[flag] = None
            else:
                _check_endpoint(flag, self[flag])
        if self["metrics-port"] is not None:
            _check_endpoint("metrics-port", self["metrics-port"])
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
                parent["logger"] = "broadcaster.logs.json_observer"
        if self["max-buffer"] < self["max-message-size"]:
            raise usage.UsageError(
                "--max-buffer {} is smaller than --max-message-size {}: a client "
                "could not be sent one message of the largest allowed size".format(
                    self["max-buffer"], self["max-message-size"]
                )
            )
        node = self["node-id"]
        if node is not None and (not node or not all(c.isalnum() or c in "_." for c in node)):
            raise usage.UsageError(
                "--node-id {!r} must be letters, digits, '_' or '.'".format(node)
            )


def _check_endpoint(flag: str, description: str) -> None:
    """
    Refuse an endpoint description that cannot be listened on, naming the flag.
    """
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except Exception as e:  # parse errors, missing certificate files, ...
        raise usage.UsageError(
            "--{} {!r} is not a valid endpoint description ({}); "
            "examples: tcp:9999, tcp:9999:interface=127.0.0.1, "
            "ssl:9443:privateKey=key.pem:certKey=cert.pem, "
            "unix:/run/chat.sock".format(flag, description, e)
        )


def describe_address(address) -> str:
    """
    ``tcp:0.0.0.0:9999`` or ``unix:/run/chat.sock`` rather than a repr.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        host = "[{}]".format(address.host) if ":" in address.host else address.host
        return "{}:{}:{}".format(address.type.lower(), host, address.port)
    if isinstance(address, UNIXAddress):
        return "unix:{}".format(address.name.decode() if isinstance(address.name, bytes) else address.name)
    return str(address)


@implementer(IStreamServerEndpoint)
class ReportingEndpoint:
    """
    Wraps a server endpoint to log the address it listens on and to keep the
    listening port, so the actual port of ``tcp:0`` can be found.

    :ivar listening: fires with the :class:`IListeningPort` once listening.
    """

    _log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, what: str) -> None:
        self._endpoint = endpoint
        self._what = what
        self.port: Optional[IListeningPort] = None
        self._waiting: List[Deferred] = []

    def listen(self, factory) -> Deferred:
        return self._endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self._log.info(
            "{what} listening on {address}", what=self._what, address=describe_address(port.getHost())
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)
        return port

    def when_listening(self) -> Deferred:
        """
        :return: a Deferred that fires with the listening port.
        """
        if self.port is not None:
            return succeed(self.port)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d


def raise_open_files_limit(log: Logger) -> None:
    """
    Raise the soft limit on open files to the hard limit: every client is a
    file descriptor, and the usual soft limit of 1024 would cap the server
    far below what it can serve.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warn("could not raise the open files limit to {hard}: {error}", hard=hard, error=e)
    log.info(
        "open files limit: {soft} (each connection takes one)",
        soft="unlimited" if soft == resource.RLIM_INFINITY else soft,
    )


class BroadcasterService(MultiService):
    """
    The whole server: a :class:`MultiService` whose children listen.

    :ivar hub: the broadcast domain, shared by every protocol.
    :ivar web_endpoint: the main port's :class:`ReportingEndpoint`.
    """

    _log = Logger()

    def __init__(self, clock, drain_timeout: float) -> None:
        super().__init__()
        self.clock = clock
        self.drain_timeout = drain_timeout

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
        """
        Stop the reactor on SIGTERM and SIGINT, which makes twistd stop this
        service (and so drain the clients) and then exit with status 0.

        Twisted's own handlers do the same but have twistd re-raise the
        signal afterwards, so the process would end "killed by SIGTERM"
        even after a clean drain; init systems and scripts expect a clean
        stop to exit 0.
        """
        import signal

        reactor = self.clock

        def stop(signum, frame):
            self._log.info(
                "received {signal}: shutting down gracefully",
                signal=signal.Signals(signum).name,
            )
            reactor.callFromThread(reactor.stop)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def stopService(self) -> Deferred:
        """
        Stop accepting connections, then close every client politely and
        wait up to ``drain_timeout`` seconds for them to go before dropping
        the rest.  twistd waits for this Deferred on SIGTERM and SIGINT.
        """
        if not self.running:
            return succeed(None)
        d = maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._drain())
        return d

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


def makeService(options: Options, reactor=None) -> BroadcasterService:
    """
    Build the server from parsed options.

    :param reactor: the reactor to listen with and to take time from
        (default: the global one).
    """
    handle_signals = reactor is None
    if reactor is None:
        from twisted.internet import reactor

    # Autobahn logs each refused handshake and dropped connection itself, at
    # info and warn; ours say the same with the client's id, so keep its
    # chatter for --debug.
    txaio.set_global_log_level("debug" if options["debug"] else "error")

    service = BroadcasterService(reactor, options["drain-timeout"])
    # Only as twistd runs us (on the global reactor): a test process that
    # builds servers on a reactor of its choosing keeps its own handlers.
    service.handle_signals = handle_signals
    service.hub = Hub(
        reactor,
        node_id=options["node-id"],
        history_size=options["history-size"],
        max_rooms=options["max-rooms"],
        max_rooms_per_member=options["max-rooms-per-client"],
        # Frame each turn's messages once and write them to each client in
        # one call: the fan-out's cost per recipient (see bench/).
        batching=True,
    )
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
    )
    factory = BroadcastServerFactory(
        service.hub,
        OriginPolicy(options["allow-origin"]),
        reactor,
        limits=limits,
        debug=options["debug"],
        max_name_length=options["max-name-length"],
    )
    service.websocket_factory = factory
    service.metrics = metrics = None
    if not options["no-metrics"]:
        registry, service.metrics = metrics_for(service.hub)
        metrics = MetricsResource(registry)
    on_main_port = metrics if options["metrics-port"] is None else None
    service.web_endpoint = _listen(
        service,
        options["port"],
        BroadcasterSite(factory, debug=options["debug"], metrics=on_main_port),
        "WebSocket endpoint and chat page",
        reactor,
    )
    service.metrics_endpoint = None
    if metrics is not None and options["metrics-port"] is not None:
        service.metrics_endpoint = _listen(
            service, options["metrics-port"], Site(metrics), "Metrics", reactor
        )

    service.image_endpoint = None
    if options["image-port"] is not None:
        decoder = DecoderPool(
            reactor,
            options["image-threads"],
            options["image-max-pixels"],
            max_png_size=options["max-image-size"],
        )
        decoder.setServiceParent(service)
        images = ImageFactory(
            service.hub,
            reactor,
            decoder.decode,
            limits=limits,
            max_image_size=options["max-image-size"],
            image_timeout=options["image-timeout"],
        )
        service.image_endpoint = _listen(
            service, options["image-port"], images, "Image protocol", reactor
        )

    service.line_endpoint = None
    if options["line-port"] is not None:
        lines = LineBridgeFactory(service.hub, reactor, options["max-line-length"], limits)
        service.line_endpoint = _listen(
            service, options["line-port"], lines, "Line bridge", reactor
        )
    return service


def _listen(parent, description: str, factory, what: str, reactor) -> ReportingEndpoint:
    """
    Add a child service listening on ``description``; return its endpoint.
    """
    listener = strports.service(description, factory, reactor=reactor)
    listener.endpoint = endpoint = ReportingEndpoint(listener.endpoint, what)
    listener.setServiceParent(parent)
    return endpoint
