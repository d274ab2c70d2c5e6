"""
broadcaster: a real-time chat and broadcast server built on Twisted and Autobahn.

The layers, one module each: :mod:`broadcaster.core.hub` (membership and fan-out,
no networking), :mod:`broadcaster.protocols.wire` (how events look on the wire),
:mod:`broadcaster.protocols.websocket` (the Autobahn protocol), :mod:`broadcaster.http.site`
(the site: page, health check, WebSocket endpoint) and :mod:`broadcaster.service.tap`
(options and ``makeService`` for ``twistd broadcaster``).
"""

__version__ = "0.1.0"
