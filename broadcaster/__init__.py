"""
broadcaster: a real-time chat and broadcast server built on Twisted and Autobahn.

The layers, one module each: :mod:`broadcaster.hub` (membership and fan-out,
no networking), :mod:`broadcaster.wire` (how events look on the wire),
:mod:`broadcaster.websocket` (the Autobahn protocol), :mod:`broadcaster.web`
(the site: page, health check, WebSocket endpoint) and :mod:`broadcaster.tap`
(options and ``makeService`` for ``twistd broadcaster``).
"""

__version__ = "0.1.0"
