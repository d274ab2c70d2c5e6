"""
The Origin policy for WebSocket handshakes.

A browser attaches an ``Origin`` header to every WebSocket handshake, and a
page on any site can open a socket to any server.  Without a check, a page on
``evil.example`` could connect to a user's chat server with the user's
cookies (cross-site WebSocket hijacking).  So by default only the server's own
origin is accepted: the scheme, host and port the browser used to reach us,
taken from the ``Host`` header and whether the connection is TLS.

Clients that send no ``Origin`` at all are scripts and devices, not browsers
acting for someone else, and are accepted.  Operators widen the policy with
``--allow-origin`` (``*`` accepts every origin).
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# A WebSocket origin is an http(s) origin: a page served over https opens wss.
_SCHEME_ALIASES = {"ws": "http", "wss": "https"}

Origin = Tuple[str, str, int]


def parse_origin(value: str) -> Optional[Origin]:
    """
    Normalise an origin such as ``https://Example.com:443`` to
    ``("https", "example.com", 443)``.

    :return: ``None`` when ``value`` is not a tuple origin (``null``, a
        relative URL, a scheme we do not know).
    """
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = _SCHEME_ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    return (scheme, parts.hostname.lower(), port)


def own_origin(host_header: Optional[str], secure: bool) -> Optional[Origin]:
    """
    The origin of this server as the client addressed it.

    :param host_header: the request's ``Host`` header (``host`` or ``host:port``).
    :param secure: whether the connection arrived over TLS.
    """
    if not host_header:
        return None
    scheme = "https" if secure else "http"
    return parse_origin("{}://{}".format(scheme, host_header))


class OriginPolicy:
    """
    Decides which handshake Origins are accepted.

    :param allowed: extra origins accepted besides our own; ``*`` accepts all.
    """

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        allowed = list(allowed)
        self.allow_all = "*" in allowed
        self._allowed = {o for o in (parse_origin(a) for a in allowed if a != "*") if o}

    def permits(self, origin: Optional[str], host_header: Optional[str], secure: bool) -> bool:
        """
        Whether a handshake with this ``Origin`` header may proceed.

        :param origin: the ``Origin`` header, or ``None`` when it was absent.
        """
        if origin is None or self.allow_all:
            return True
        parsed = parse_origin(origin)
        if parsed is None:
            # "null" (sandboxed frames, file: pages) and garbage: a browser
            # whose origin we cannot name is not one we have allowed.
            return False
        return parsed == own_origin(host_header, secure) or parsed in self._allowed
