"""
WebSocket upgrades on the main port: how a connection that twisted.web
accepted becomes a WebSocket connection.

Every connection to the main port starts as an HTTP connection
(:class:`~broadcaster.http.site.BoundedChannel`): the page, ``/healthz``,
``/events`` and the WebSocket handshake share the port.  Going through
twisted.web, a handshake is parsed twice: by twisted.web into a request
routed to ``/``, and again by Autobahn from a copy of that request made
back into bytes.  In a connection storm that first parse, the request
and the routing were a seventh of each connection's cost.

So the usual handshake is recognised in the connection's first bytes
(:func:`plain_upgrade`) and handed to Autobahn as it came: a ``GET /`` in
HTTP/1.1, whole in one read, with ``Upgrade: websocket``, no body, no
header twice, nothing twisted.web would refuse or parse differently, and
a ``Host`` the server answers to.  Anything else (a refusal among it)
takes twisted.web's path, unchanged: this is a shortcut for requests both
paths treat alike, never a second set of rules.  Either way
:func:`hand_over` gives the connection to the WebSocket protocol, under
the connection limits it was admitted under.
"""

from __future__ import annotations

import re
from twisted.protocols.policies import ProtocolWrapper

from broadcaster.protocols.origin import HostPolicy

#: Header blocks larger than this take twisted.web's path (whose own limit
#: is 16 KiB): no handshake a client sends is nearly this large.
MOST_HEADER_BYTES = 8192

#: Requests with more header lines than this take twisted.web's path
#: (which refuses more than 500 with 400).
MOST_HEADERS = 100

# A header name, as RFC 9110 5.1 and twisted.web have it.
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

# What no header value holds (but tab): twisted.web would refuse or
# mangle it; its path says so.
_ODD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# A request target of printable ASCII: twisted.web refuses control
# characters and most bytes beyond ASCII (Autobahn would take them).
_TARGET = re.compile(rb"/(?:\?[\x21-\x7e]*)?\Z")

# Headers that announce a body (a handshake has none), and Expect, which
# twisted.web answers with 100 Continue before anything else.
_BODY = frozenset((b"content-length", b"transfer-encoding", b"expect"))


def plain_upgrade(data: bytes, hosts: HostPolicy) -> bool:
    """
    Whether ``data``, the first bytes read from a connection, are the
    whole of an ordinary WebSocket handshake for ``/`` that the server
    answers to (see the module docstring), and nothing more.

    :param hosts: the ``Host`` names the site answers to.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(data) or end > MOST_HEADER_BYTES:
        return False
    lines = data[:end].split(b"\r\n")
    if len(lines) > MOST_HEADERS + 1:
        return False
    request = lines[0].split(b" ")
    if len(request) != 3 or request[0] != b"GET" or request[2] != b"HTTP/1.1":
        return False
    if not _TARGET.match(request[1]):
        return False
    seen = set()
    upgrade = host = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _NAME.match(name) or _ODD_VALUE.search(value):
            return False
        name = name.lower()
        if name in seen or name in _BODY:
            return False
        seen.add(name)
        if name == b"upgrade":
            upgrade = value
        elif name == b"host":
            host = value
    if upgrade is None or upgrade.strip().lower() != b"websocket":
        return False
    if hosts.open:
        return True
    # Latin-1 maps every byte, as BoundedChannel reads it.
    return host is not None and hosts.permits(host.strip().decode("latin-1"))


def hand_over(channel, factory):
    """
    Give ``channel``'s connection to a new protocol of ``factory`` (the
    WebSocket factory), as Autobahn's ``WebSocketResource`` does, with the
    connection's place under the connection limits.

    :param channel: the :class:`~broadcaster.http.site.BoundedChannel`
        whose connection it is.
    :return: the protocol, connected and waiting for the handshake's
        bytes, which the caller gives it at once (all of them), or ``None``
        if none was made (the channel keeps the connection).
    """
    channel.setTimeout(None)
    channel.handed_over()
    factory.adopt(channel.ticket)
    try:
        protocol = factory.buildProtocol(channel.transport.getPeer())
    finally:
        if factory.adopt(None) is None:
            channel.ticket = None
        else:
            channel.handed_back()
    if protocol is None:
        return None
    # Its whole handshake is given to it next (its open handshake timeout
    # is for waiting on its sign-in, if it has to).
    protocol.handshake_at_hand = True
    transport, channel.transport = channel.transport, None
    if isinstance(transport, ProtocolWrapper):
        # TLS, as a wrapping protocol.
        transport.wrappedProtocol = protocol
    elif isinstance(transport.protocol, ProtocolWrapper):
        # TLS, as Twisted's newer TLS transports wrap it.
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    # twisted.web pauses the transport while it serves a request; no other
    # request follows a handshake.
    if hasattr(transport, "_networkProducer"):
        transport._networkProducer.resumeProducing()
    elif hasattr(transport, "resumeProducing"):
        transport.resumeProducing()
    return protocol


def replayed(request) -> bytes:
    """
    The handshake ``request`` (a twisted.web request) made back into
    bytes for Autobahn, as its ``WebSocketResource`` does.
    """
    data = [request.method, b" ", request.uri, b" HTTP/1.1\r\n"]
    for name, values in request.requestHeaders.getAllRawHeaders():
        data += [name, b": ", b",".join(values), b"\r\n"]
    data.append(b"\r\n")
    data.append(request.content.read())
    return b"".join(data)


__all__ = ["MOST_HEADERS", "MOST_HEADER_BYTES", "hand_over", "plain_upgrade", "replayed"]
