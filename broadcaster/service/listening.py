"""
Where the server listens: endpoint descriptions (checked when the options
are parsed, with a ``backlog=`` added, and whether they listen on loopback
only), the endpoint that logs and reports the address it listens on, and
the open files limit every connection counts against.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from broadcaster.protocols.internals import use_lean_transports
from broadcaster.protocols.origin import is_loopback_name


#: Endpoint types that take a ``backlog=`` parameter.
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str, backlog: int) -> str:
    """
    ``description`` with ``backlog=`` added, if its endpoint type takes one
    and it does not already say.
    """
    kind, _, rest = description.partition(":")
    if kind.lower() not in _BACKLOG_TYPES or not rest:
        return description
    if any(part.strip().lower().startswith("backlog=") for part in rest.split(":")):
        return description
    return "{}:backlog={}".format(description, backlog)


class _NotListening:
    """The reactor an endpoint is built with when it is only being checked."""


def check_endpoint(flag: str, description: str) -> None:
    """
    Refuse an endpoint description that cannot be listened on, naming the flag.
    """
    from twisted.internet import endpoints

    try:
        # Parsing only builds the endpoint (loading certificates, say); the
        # reactor is not touched until it listens, so none is given.
        endpoints.serverFromString(_NotListening(), description)
    except Exception as e:  # parse errors, missing certificate files, ...
        raise usage.UsageError(
            "--{} {!r} is not a valid endpoint description ({}); "
            "examples: tcp:9999, tcp:9999:interface=127.0.0.1, "
            "ssl:9443:privateKey=key.pem:certKey=cert.pem, "
            "unix:/run/chat.sock".format(flag, description, e)
        )


#: Endpoint types that listen on an ``interface=`` (by default, all of them).
_INTERFACE_TYPES = ("tcp", "tcp6", "ssl")


class _InterfaceOnly:
    """
    The reactor an endpoint is built with to learn which interface it would
    listen on: Twisted parses the description (``interface=``, positional,
    escaped), this only notes the result.
    """

    interface = ""

    def listenTCP(self, port, factory, backlog=50, interface="") -> None:
        self.interface = interface

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface="") -> None:
        self.interface = interface


def loopback_only(description: str) -> bool:
    """
    Whether an endpoint description listens on loopback only (``interface=``
    127.0.0.1, ::1, localhost or another loopback address), so that only
    this machine can connect to it.  A ``unix:`` socket, or any other
    type, is not counted as loopback: what sits in front of it (a proxy)
    decides who reaches it.
    """
    if description.partition(":")[0] not in _INTERFACE_TYPES:
        return False
    from twisted.internet import endpoints

    reactor = _InterfaceOnly()
    endpoints.serverFromString(reactor, description).listen(None)
    return bool(reactor.interface) and is_loopback_name(reactor.interface.lower())


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
        # Each connection's transport is part of what an idle client costs.
        use_lean_transports(port)
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
