"""
Who may address this server from a browser: the Origin policy for WebSocket
handshakes, and the Host policy for every HTTP request on the main port.

A browser attaches an ``Origin`` header to every WebSocket handshake, and a
page on any site can open a socket to any server.  Without a check, a page on
``evil.example`` could connect to a user's chat server with the user's
cookies (cross-site WebSocket hijacking).  So by default only the server's own
origin is accepted: the scheme, host and port the browser used to reach us,
taken from the ``Host`` header and whether the connection is TLS.

Clients that send no ``Origin`` at all are scripts and devices, not browsers
acting for someone else, and are accepted.  Operators widen the policy with
``--allow-origin`` (``*`` accepts every origin).

Our own origin is only as good as the ``Host`` header it is taken from.  A
page on ``evil.example`` that rebinds its DNS name to 127.0.0.1 (DNS
rebinding) reaches a server on loopback as ``Host: evil.example`` with
``Origin: http://evil.example``: its own origin, to the check above, and
every page and API of the server is same-origin to it.  So the
:class:`HostPolicy` decides which names the server answers to at all: on
loopback only, by default the loopback names (which no page can rebind);
with ``--allow-host``, those names (and the loopback names, on loopback);
listening beyond loopback without ``--allow-host``, any name.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
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


# A host name as it is compared: letters, digits, '-', '_' and dots (IDN
# names in their xn-- form, as browsers send them).
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
# What may follow the host in a Host header: a port, possibly empty (RFC 9110 4.2.1).
_PORT = re.compile(r"(?::[0-9]*)?")


def _address(text: str) -> Optional[str]:
    """``text`` as the canonical form of an IP address, or ``None``."""
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return None


def _name(text: str) -> Optional[str]:
    """
    A host name or address without port or brackets, in the form it is
    compared in: lower case, an IP address in its canonical form, one
    trailing dot dropped (``localhost.`` is ``localhost`` to DNS).
    """
    text = text.lower()
    address = _address(text)
    if address is not None:
        return address
    if text.endswith("."):
        text = text[:-1]
    return text if _NAME.fullmatch(text) else None


def host_name(host_header: str) -> Optional[str]:
    """
    The host a ``Host`` header names, as :class:`HostPolicy` compares it:
    ``Chat.Example.:8080`` is ``chat.example``, ``[0:0::1]:9999`` is ``::1``.

    :return: ``None`` when the header is not ``host[:port]`` with a host
        name, an IPv4 address or a bracketed IPv6 address.
    """
    value = host_header.strip()
    if value.startswith("["):
        inside, bracket, port = value[1:].partition("]")
        host = _address(inside) if bracket and ":" in inside else None
    else:
        host, colon, port = value.partition(":")
        port = colon + port
        host = _name(host) if host else None
    if host is None or not _PORT.fullmatch(port):
        return None
    return host


def allowed_host_name(value: str) -> Optional[str]:
    """
    An ``--allow-host`` value as :class:`HostPolicy` compares it: a host
    name (``chat.example.com``), an IPv4 address, or an IPv6 address with
    or without brackets; never a port, a scheme or a path.

    :return: ``None`` when ``value`` is none of those.
    """
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
        return _address(value) if ":" in value else None
    return _name(value)


def is_loopback_name(name: str) -> bool:
    """
    Whether ``name`` (as :func:`host_name` returns it) can only mean this
    machine, so that no page can rebind it: ``localhost``, names under
    ``.localhost`` (RFC 6761 reserves them for loopback, and browsers
    resolve them so without asking DNS), and loopback addresses.
    """
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class HostPolicy:
    """
    Decides which ``Host`` names an HTTP request may address this server by
    (see the module docstring for why).

    :param allowed: the names of ``--allow-host``, each as
        :func:`allowed_host_name` accepts it.
    :param loopback: whether the server listens on loopback only: then the
        loopback names (:func:`is_loopback_name`) are accepted as well.
    :ivar open: whether every name is accepted (no ``allowed``, not
        ``loopback``): today's behaviour beyond loopback.
    """

    def __init__(self, allowed: Iterable[str] = (), loopback: bool = False) -> None:
        names = set()
        for value in allowed:
            name = allowed_host_name(value)
            if name is None:
                raise ValueError("{!r} is not a host name or address".format(value))
            names.add(name)
        self._names = frozenset(names)
        self.loopback = loopback
        self.open = not names and not loopback
        # Headers already judged: nearly every request names the host the
        # last one did, and parsing it (an IP address) was a tenth of a
        # handshake's cost.  Bounded: the header is the client's to choose.
        self._verdict = lru_cache(maxsize=self.REMEMBERED)(self._judge)

    #: Verdicts kept at most (the least recently asked forgotten first).
    REMEMBERED = 256

    def permits(self, host_header: str) -> bool:
        """
        Whether a request with this ``Host`` header may be answered.
        """
        if self.open:
            return True
        return self._verdict(host_header)

    def _judge(self, host_header: str) -> bool:
        name = host_name(host_header)
        if name is None:
            return False
        return name in self._names or (self.loopback and is_loopback_name(name))
