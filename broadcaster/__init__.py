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

``from broadcaster import Client`` is the blocking client library
(:mod:`broadcaster.clients.library`, with its exceptions and
``Recovered``), imported only when asked for, so that the server needs
neither it nor websocket-client.
"""

__version__ = "0.1.0"

#: What :mod:`broadcaster.clients.library` exports here, imported on first
#: use: the server never pays for websocket-client, nor needs it installed.
#: Its ``__all__`` again, since reading that would import it;
#: tests/clients/test_library.py keeps the two in step.
_CLIENT_NAMES = frozenset(
    [
        "Client",
        "ClientError",
        "ConnectError",
        "HandshakeRefused",
        "ConnectionClosed",
        "RequestRefused",
        "RequestTimeout",
        "Recovered",
    ]
)


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        from broadcaster.clients import library

        return getattr(library, name)
    raise AttributeError("module 'broadcaster' has no attribute {!r}".format(name))


def __dir__():
    return sorted(list(globals()) + list(_CLIENT_NAMES))
