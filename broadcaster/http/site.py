"""
The HTTP side of the main port: the chat page, ``/healthz`` and the
WebSocket endpoint, all on one :class:`twisted.web.server.Site`.

``/`` is both the page and the WebSocket endpoint, as in the classic example
where clients connect to ``ws://host:9999/``: a request carrying
``Upgrade: websocket`` is handed to Autobahn (:mod:`broadcaster.http.upgrade`;
the usual handshake without twisted.web parsing it first), any other
``GET /`` gets the page.

The page's files are small and read once when the site is built, so serving
them never touches the disk on the reactor thread.

Every HTTP request is bounded before it is read (:class:`BoundedChannel`):

- a request for a host name the server does not answer to (the
  :class:`~broadcaster.protocols.origin.HostPolicy` of ``--allow-host``, and
  by default on loopback the loopback names) gets 403 before anything else,
  the WebSocket handshake, the page, ``/healthz``, ``/metrics`` and
  ``/api`` alike: a page that rebinds its DNS name to this server must
  read nothing of it.  Under such a policy an HTTP/1.1 request with no
  ``Host``, or more than one, gets 400 (RFC 9112 3.2); an HTTP/1.0 one
  with none is answered (no browser sends it);
- the connection counts under ``--max-connections`` from the moment it is
  accepted (:mod:`broadcaster.protocols.admission`); over a limit it is answered 503;
- from the connection (or the end of its previous request) to the end of
  its request, body included, a client has ``--open-handshake-timeout``
  seconds, however it trickles its bytes; then 408;
- methods other than GET, HEAD and POST get 405, and a body larger than the
  path accepts (``POST /api/publish``: ``--max-message-size``; anything
  else: :data:`SMALL_BODY`) gets 413, from its ``Content-Length`` before
  any of it is read, or as soon as a chunked body passes the limit; bodies
  are kept in memory (they are small), never spooled to a file;
- a WebSocket upgrade in HTTP/1.0 gets 400 (RFC 6455 4.1 requires 1.1).
"""

from __future__ import annotations

import json
import mimetypes
from importlib import resources
from io import BytesIO
from typing import Optional

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from broadcaster import __version__
from broadcaster.core.stats import Stats
from broadcaster.http.events import EventsResource
from broadcaster.http.upgrade import hand_over, plain_upgrade, replayed
from broadcaster.protocols.admission import Admission, AdmittingFactory, http_refusal, say_and_hang_up
from broadcaster.protocols.origin import HostPolicy
from broadcaster.protocols.websocket import BroadcastServerFactory

#: The largest body accepted on any path but ``POST /api/publish``: none
#: of them reads one.
SMALL_BODY = 1024

# A strict policy for our own page: scripts and styles only from this server,
# WebSocket only back to it, no framing by other sites.  img-src allows blob:
# for the pictures of image events, which the server re-encoded; the page
# makes no image of a client's raw binary (a policy cannot tell one Blob from
# another, so chat.js keeps that promise), and data: is its empty icon.
_PAGE_HEADERS = {
    b"Content-Security-Policy": b"default-src 'self'; connect-src 'self'; "
    b"img-src 'self' blob: data:; frame-ancestors 'none'; base-uri 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
}


class StaticFile(Resource):
    """
    One in-memory file with our security headers.
    """

    isLeaf = True

    def __init__(self, body: bytes, content_type: str) -> None:
        super().__init__()
        self._body = body
        self._content_type = content_type.encode("ascii")

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", self._content_type)
        request.setHeader(b"Cache-Control", b"no-cache")
        for name, value in _PAGE_HEADERS.items():
            request.setHeader(name, value)
        return self._body

    render_HEAD = render_GET


def load_static(folder: str = "static") -> dict:
    """
    Read a page's files from the installed package: the chat page's, or
    another's (its folder's sub-folders are not read).

    :param folder: the files' folder in the package, ``/``-separated.
    :return: file name (bytes) to :class:`StaticFile`.
    """
    files = {}
    for entry in resources.files("broadcaster").joinpath(*folder.split("/")).iterdir():
        if entry.is_file():
            content_type, _ = mimetypes.guess_type(entry.name)
            if content_type is None:
                content_type = "application/octet-stream"
            elif content_type.startswith("text/") or content_type.endswith("javascript"):
                content_type += "; charset=utf-8"
            files[entry.name.encode("utf-8")] = StaticFile(entry.read_bytes(), content_type)
    return files


class EntryPoint(Resource):
    """
    ``/``: the WebSocket handshake when the request asks to upgrade, else the page.
    """

    isLeaf = True

    def __init__(self, factory: BroadcastServerFactory, page: Resource) -> None:
        super().__init__()
        self._factory = factory
        self._page = page

    def render(self, request: Request):
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade.lower() == b"websocket":
            if request.clientproto != b"HTTP/1.1":
                # RFC 6455 4.1: "The method of the request MUST be GET, and
                # the HTTP version MUST be at least 1.1."
                self._log.warn(
                    "[REFUSED] {peer}: WebSocket upgrade in {version}; answered 400",
                    peer=_peer(request),
                    version=request.clientproto.decode("ascii", "replace"),
                )
                request.setResponseCode(400)
                request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
                request.setHeader(b"Connection", b"close")
                return b"a WebSocket handshake needs HTTP/1.1 (RFC 6455 section 4.1)\n"
            # From here on Autobahn owns the connection (and its own
            # timeouts); the HTTP channel's timers must not fire on it,
            # and the protocol the upgrade makes takes over its place
            # under the connection limits.
            protocol = hand_over(request.channel, self._factory)
            if protocol is None:
                request.setResponseCode(500)
                return b""
            protocol.dataReceived(replayed(request))
            return NOT_DONE_YET
        return self._page.render(request)

    _log = Logger()


def _peer(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", address))


class BoundedRequest(Request):
    """
    A request whose body is bounded (:meth:`BoundedChannel.allHeadersReceived`
    sets :attr:`body_limit`) and kept in memory.
    """

    body_limit = SMALL_BODY
    _body_size = 0

    def gotLength(self, length: Optional[int]) -> None:
        # Twisted spools bodies over 100 kB to a temporary file: on the
        # reactor thread, and without a bound.  Ours are bounded and small.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > self.body_limit:
            self.channel.refuse(
                b"413 Content Too Large",
                "the body is larger than {} bytes".format(self.body_limit),
            )
            return
        super().handleContentChunk(data)


class BoundedChannel(HTTPChannel):
    """
    An HTTP connection to the main port, bounded before it is read (see
    the module docstring): under the connection limits from accept, one
    deadline for each whole request, no body larger than its path takes.
    """

    _log = Logger()

    #: The connection's place under --max-connections (see
    #: :class:`broadcaster.protocols.admission.AdmittingFactory`).
    ticket = None
    _deadline = None
    _refused = False
    _upgraded = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def _start_deadline(self) -> None:
        self._cancel_deadline()
        timeout = self.site.request_timeout
        if timeout:
            self._deadline = self.callLater(timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(
            b"408 Request Timeout",
            "the request did not arrive within {:g} s".format(self.site.request_timeout),
        )

    def refuse(
        self,
        status: bytes,
        reason: str,
        log_format: str = "[REFUSED] {peer}: {reason}; answered {status}",
        **fields,
    ) -> None:
        """
        Answer ``status`` and hang up, reading nothing more of this
        connection: what the client still sends is discarded until it
        closes, or for a few seconds.

        :param reason: the body of the answer.
        :param log_format: the warning logged, with the fields ``peer``,
            ``reason``, ``status`` and ``fields``.
        """
        if self._refused or self.transport is None:
            return
        self._refused = True
        self._cancel_deadline()
        self.setTimeout(None)
        address = self.transport.getPeer()
        self._log.warn(
            log_format,
            peer=getattr(address, "host", address),
            reason=reason,
            status=status.decode("ascii"),
            **fields,
        )
        self.site.stats.refused_requests[status[:3].decode("ascii")] += 1
        self._deadline = say_and_hang_up(
            self.transport, http_refusal(reason, status), self.site.clock
        )

    _streaming = False
    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first:
            self._first = False
            websocket = self.site.websocket
            if (
                websocket is not None
                and not self._refused
                and plain_upgrade(data, self.site.hosts)
            ):
                protocol = hand_over(self, websocket)
                if protocol is not None:
                    protocol.dataReceived(data)
                    return
        if not self._refused and not self._streaming:
            super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused and not self._streaming:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        if not self._host_allowed():
            return
        method = self._command
        if method not in (b"GET", b"HEAD", b"POST"):
            self.refuse(
                b"405 Method Not Allowed",
                "{} is not served here (GET, HEAD and POST are)".format(
                    method.decode("ascii", "replace")
                ),
            )
            return
        limit = self.site.body_limit(method, self._path)
        if self.length is not None and self.length > limit:
            self.refuse(
                b"413 Content Too Large",
                "a body of {} bytes is larger than the {} bytes {} takes".format(
                    self.length, limit, self._path.split(b"?")[0].decode("ascii", "replace")
                ),
            )
            return
        self.requests[-1].body_limit = limit
        super().allHeadersReceived()

    def _host_allowed(self) -> bool:
        """
        Whether the request names a host the site answers to
        (:attr:`BoundedSite.hosts`); if not, it is refused.
        """
        policy = self.site.hosts
        if policy.open:
            return True
        hosts = self.requests[-1].requestHeaders.getRawHeaders(b"host", [])
        if not hosts and self._version == b"HTTP/1.0":
            return True
        if len(hosts) != 1:
            self.refuse(
                b"400 Bad Request",
                "one Host header is required (RFC 9112 section 3.2)",
            )
            return False
        # Latin-1 maps every byte: anything but ASCII is then no host name.
        host = hosts[0].decode("latin-1")
        if policy.permits(host):
            return True
        self.refuse(
            b"403 Forbidden",
            "host not allowed",
            "[REFUSED] {peer}: Host {host!r} not allowed; answered 403",
            host=host,
        )
        return False

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        super().allContentReceived()

    def requestDone(self, request) -> None:
        super().requestDone(request)
        if not self._refused and not self._upgraded and self.transport is not None:
            # The next request on this connection has a deadline of its own.
            self._start_deadline()

    def streaming(self) -> None:
        """
        The request is answered with a stream (``GET /events``) that lasts
        as long as the client stays: no deadline and no idle timeout apply
        to it (the stream's keepalive comments and --max-buffer do).  What
        the client sends after it is read and discarded (no other request
        is answered on this connection), so that its going is noticed at
        once.
        """
        self._cancel_deadline()
        self.setTimeout(None)
        self._streaming = True
        self.transport.resumeProducing()

    def handed_over(self) -> None:
        """
        A WebSocket upgrade takes this connection over: its own timeouts
        apply from now on.
        """
        self._upgraded = True
        self._cancel_deadline()

    def handed_back(self) -> None:
        """
        The upgrade failed before a WebSocket protocol took the connection.
        """
        self._upgraded = False

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        if self.ticket is not None and not self._upgraded:
            self.ticket.release()
        super().connectionLost(reason)


class Health(Resource):
    """
    ``/healthz``: JSON a load balancer or operator can poll.
    """

    isLeaf = True

    def __init__(self, factory: BroadcastServerFactory) -> None:
        super().__init__()
        self._factory = factory

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        body = {
            "status": "ok",
            "version": __version__,
            "node": self._factory.hub.node_id,
            "connections": len(self._factory.hub),
            "refused_handshakes": sum(self._factory.hub.stats.refused_handshakes.values()),
            "backplane": self._factory.hub.backplane.state(),
        }
        return json.dumps(body).encode("utf-8")


class BoundedSite(AdmittingFactory, Site):
    """
    A site whose connections are admitted by the server's one admission
    policy and whose requests are bounded before they are read
    (:class:`BoundedChannel`): the main port's, and ``--metrics-port``'s.

    :param request_timeout: seconds each whole request may take.
    :param hosts: the host names it answers to (default: any).
    """

    protocol = BoundedChannel
    requestFactory = BoundedRequest
    refusal = staticmethod(http_refusal)
    noisy = False

    #: The WebSocket factory an upgrade of ``/`` is handed to at once
    #: (:func:`~broadcaster.http.upgrade.plain_upgrade`), or ``None``.
    websocket: Optional[BroadcastServerFactory] = None

    def __init__(
        self,
        resource: Resource,
        clock,
        stats: Stats,
        request_timeout: float,
        admission: Optional[Admission] = None,
        listener: str = "HTTP port",
        hosts: Optional[HostPolicy] = None,
    ) -> None:
        self.admission = admission
        self.hosts = hosts if hosts is not None else HostPolicy()
        self.listener = listener
        self.clock = clock
        self.stats = stats
        self.request_timeout = request_timeout
        # An idle HTTP connection (one that never sends its request, or its
        # WebSocket handshake) is closed after request_timeout too:
        # twisted.web's default would keep it for 12 hours.
        super().__init__(resource, timeout=request_timeout, reactor=clock)
        self.displayTracebacks = False

    def body_limit(self, method: bytes, target: bytes) -> int:
        """
        The largest body a request for ``target`` (path and query) may have.
        """
        return SMALL_BODY


class BroadcasterSite(BoundedSite):
    """
    The site on the main port.  Twisted's per-request access log is only
    written with ``--debug``: handshakes are already logged where they mean
    something, and a busy server should not drown its log in request lines.
    """

    def __init__(
        self,
        factory: BroadcastServerFactory,
        debug: bool = False,
        metrics: Optional[Resource] = None,
        api: Optional[Resource] = None,
        admission: Optional[Admission] = None,
        api_body_limit: int = 0,
        hosts: Optional[HostPolicy] = None,
        admin: Optional[Resource] = None,
    ) -> None:
        self._debug = debug
        if not debug:
            # With --debug every request is logged, upgrades too: they
            # take twisted.web's path.
            self.websocket = factory
        self._api_body_limit = api_body_limit if api is not None else 0
        static = load_static()
        root = Resource()
        root.putChild(b"", EntryPoint(factory, static[b"index.html"]))
        root.putChild(b"healthz", Health(factory))
        root.putChild(b"events", EventsResource(factory))
        if metrics is not None:
            root.putChild(b"metrics", metrics)
        if api is not None:
            # POST /api/publish (broadcaster.http.api); absent, so 404, without keys.
            root.putChild(b"api", api)
        if admin is not None:
            # The operator dashboard (broadcaster.http.admin); absent, so 404,
            # without keys or with --no-admin.
            root.putChild(b"admin", admin)
        assets = Resource()
        for name, resource in static.items():
            assets.putChild(name, resource)
        root.putChild(b"static", assets)
        super().__init__(
            root,
            factory.clock,
            factory.hub.stats,
            factory.limits.open_handshake_timeout,
            admission,
            "main port",
            hosts,
        )

    def body_limit(self, method: bytes, target: bytes) -> int:
        if method == b"POST" and target.split(b"?", 1)[0] == b"/api/publish":
            return max(self._api_body_limit, SMALL_BODY)
        return SMALL_BODY

    _log = Logger()

    def log(self, request: Request) -> None:
        if not self._debug:
            return
        address = request.getClientAddress()
        self._log.debug(
            "{peer} {method} {uri} -> {code}",
            peer=getattr(address, "host", address),
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            code=request.code,
        )
