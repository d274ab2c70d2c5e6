"""
broadcaster: a real-time chat and broadcast server built on Twisted and Autobahn.

One subpackage per layer, each importing only those below it (checked by
``tests/test_layers.py``): :mod:`broadcaster.core` (the domain: hub, events,
the fan-out engine, histories, flow limits, the backplane interface; no
networking), :mod:`broadcaster.protocols` (the connection core every client
kind shares, WebSocket, line bridge, image port, wire codecs),
:mod:`broadcaster.http` (the site, publish API, sign-in, webhooks, fetching,
metrics), :mod:`broadcaster.redis` (the Redis backplane),
:mod:`broadcaster.service` (options and ``makeService`` for ``twistd
broadcaster``, the ``--workers`` master) and :mod:`broadcaster.clients`.
"""

__version__ = "0.1.0"
