"""
The HTTP side of the main port: the chat page, ``/healthz`` and the
WebSocket endpoint, all on one :class:`twisted.web.server.Site`.

``/`` is both the page and the WebSocket endpoint, as in the classic example
where clients connect to ``ws://host:9999/``: a request carrying
``Upgrade: websocket`` is handed to Autobahn's :class:`WebSocketResource`,
any other ``GET /`` gets the page.

The page's files are small and read once when the site is built, so serving
them never touches the disk on the reactor thread.
"""

from __future__ import annotations

import json
import mimetypes
from importlib import resources
from typing import Optional

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from broadcaster import __version__
from broadcaster.websocket import BroadcastServerFactory

# A strict policy for our own page: scripts and styles only from this server,
# WebSocket only back to it, no framing by other sites.
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


def load_static() -> dict:
    """
    Read the page's files from the installed package.

    :return: file name (bytes) to :class:`StaticFile`.
    """
    files = {}
    for entry in resources.files("broadcaster").joinpath("static").iterdir():
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

    def __init__(self, websocket: WebSocketResource, page: Resource) -> None:
        super().__init__()
        self._websocket = websocket
        self._page = page

    def render(self, request: Request):
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade.lower() == b"websocket":
            # From here on Autobahn owns the connection (and its own
            # timeouts); the HTTP channel's idle timer must not fire on it.
            request.channel.setTimeout(None)
            return self._websocket.render(request)
        return self._page.render(request)


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


class BroadcasterSite(Site):
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
    ) -> None:
        self._debug = debug
        static = load_static()
        root = Resource()
        root.putChild(b"", EntryPoint(WebSocketResource(factory), static[b"index.html"]))
        root.putChild(b"healthz", Health(factory))
        if metrics is not None:
            root.putChild(b"metrics", metrics)
        if api is not None:
            # POST /api/publish (broadcaster.api); absent, so 404, without keys.
            root.putChild(b"api", api)
        assets = Resource()
        for name, resource in static.items():
            assets.putChild(name, resource)
        root.putChild(b"static", assets)
        # An idle HTTP connection (one that never sends its request, or its
        # WebSocket handshake) is closed after --open-handshake-timeout:
        # twisted.web's default would keep it for 12 hours.
        super().__init__(root, timeout=factory.limits.open_handshake_timeout)
        self.displayTracebacks = False

    _log = Logger()
    noisy = False

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
