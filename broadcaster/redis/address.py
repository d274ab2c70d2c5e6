"""
Where Redis is: ``--redis`` URLs (``redis://``, ``unix:``,
``redis+sentinel://``) parsed into a :class:`RedisAddress`.

With Sentinel the address is the sentinels and the name of the master they
watch: every connection (and every reconnection, after a failover) first
asks the sentinels, in turn, where the master is now
(:class:`SentinelEndpoint`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

import txredisapi
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

#: Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class RedisAddress:
    """
    Where Redis is: a TCP host and port, or a Unix socket path.
    """

    host: Optional[str] = None
    port: int = 6379
    path: Optional[str] = None
    db: int = 0
    password: Optional[str] = None
    username: Optional[str] = None
    #: With Sentinel: the sentinels' ``(host, port)``, and the master's name.
    sentinels: Tuple[Tuple[str, int], ...] = ()
    master: Optional[str] = None
    #: With Redis Cluster: nodes to ask for the cluster's slots.
    cluster: Tuple[Tuple[str, int], ...] = ()

    def endpoint(self, reactor) -> IStreamClientEndpoint:
        """
        A client endpoint that connects to it.
        """
        if self.sentinels:
            return SentinelEndpoint(reactor, self.sentinels, self.master)
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=CONNECT_TIMEOUT)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)

    def redacted(self) -> str:
        """
        The address as a URL without the password, for logs and /healthz.
        """
        if self.path is not None:
            return "unix:{}{}".format(self.path, "?db={}".format(self.db) if self.db else "")
        credentials = ""
        if self.password is not None:
            credentials = "{}:***@".format(self.username or "")
        if self.sentinels:
            return "redis+sentinel://{}{}/{}/{}".format(
                credentials, _hosts(self.sentinels), quote(self.master, safe=""), self.db
            )
        if self.cluster:
            return "redis+cluster://{}{}".format(credentials, _hosts(self.cluster))
        host = "[{}]".format(self.host) if ":" in self.host else self.host
        return "redis://{}{}:{}/{}".format(credentials, host, self.port, self.db)

    def without_password(self) -> str:
        """
        The address as a URL that :func:`parse_redis_url` reads back to
        this address without its password (the user name kept): what may
        stand on a command line.
        """
        if self.path is not None:
            return "unix:{}{}".format(
                quote(self.path, safe="/"), "?db={}".format(self.db) if self.db else ""
            )
        user = quote(self.username, safe="") + "@" if self.username else ""
        if self.sentinels:
            return "redis+sentinel://{}{}/{}/{}".format(
                user, _hosts(self.sentinels), quote(self.master, safe=""), self.db
            )
        if self.cluster:
            return "redis+cluster://{}{}".format(user, _hosts(self.cluster))
        host = "[{}]".format(self.host) if ":" in self.host else self.host
        return "redis://{}{}:{}/{}".format(user, host, self.port, self.db)

    def shard_name(self) -> str:
        """
        The name this server stands under on the ring of ``--redis``
        servers (:mod:`broadcaster.redis.ring`): where it is, without
        credentials; a Sentinel-watched master by its name, wherever the
        sentinels are.
        """
        if self.sentinels:
            return "sentinel:{}/{}".format(self.master, self.db)
        if self.cluster:
            return "cluster:{}".format(_hosts(self.cluster))
        if self.path is not None:
            return "unix:{}/{}".format(self.path, self.db)
        host = "[{}]".format(self.host) if ":" in self.host else self.host
        return "{}:{}/{}".format(host, self.port, self.db)


def _hosts(hosts: Tuple[Tuple[str, int], ...]) -> str:
    return ",".join(
        "{}:{}".format("[{}]".format(host) if ":" in host else host, port) for host, port in hosts
    )


class NoMaster(ConnectionError):
    """
    No sentinel could say where the master is.
    """


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to the master that the sentinels name now: asks each sentinel
    in turn (``SENTINEL get-master-addr-by-name``), then connects there.
    Each reconnection asks again, so a failover is followed.

    :param sentinels: ``(host, port)`` of each sentinel.
    :param master: the name the sentinels know the master by.
    """

    _log = Logger()

    def __init__(self, reactor, sentinels: Tuple[Tuple[str, int], ...], master: str) -> None:
        self._reactor = reactor
        self.sentinels = sentinels
        self.master = master

    @inlineCallbacks
    def locate(self):
        """
        :return: a Deferred firing with the master's ``(host, port)``.
        :raise NoMaster: (in the Deferred) if no sentinel answered with one.
        """
        problems = []
        for host, port in self.sentinels:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=CONNECT_TIMEOUT)
            try:
                protocol = yield connectProtocol(
                    endpoint, txredisapi.RedisProtocol(charset="utf-8", replyTimeout=CONNECT_TIMEOUT)
                )
            except Exception as e:
                problems.append("{}:{}: {}".format(host, port, e))
                continue
            try:
                yield protocol.whenConnected()
                reply = yield protocol.execute_command(
                    "SENTINEL", "get-master-addr-by-name", self.master
                )
            except Exception as e:
                problems.append("{}:{}: {}".format(host, port, e))
                continue
            finally:
                protocol.transport.loseConnection()
            if reply:
                return reply[0], int(reply[1])
            problems.append("{}:{} knows no master {!r}".format(host, port, self.master))
        raise NoMaster("no sentinel named the master: " + "; ".join(problems))

    def connect(self, factory):
        def located(address):
            host, port = address
            return HostnameEndpoint(self._reactor, host, port, timeout=CONNECT_TIMEOUT).connect(
                factory
            )

        return self.locate().addCallback(located)


def redact_url(url: str) -> str:
    """
    ``url`` as given, its password (after ``user:`` or in ``password=``)
    replaced by ``***``: for an error about a URL that may not parse.
    """
    url = re.sub(r"(password=)[^&#]*", r"\1***", url)
    return re.sub(r"^([^/]*//[^/@:]*:)[^/]*@", r"\1***@", url)


_URL_FORMS = (
    "redis://[[user]:password@]host[:port][/db], unix:/path/to/redis.sock[?db=N],"
    " redis+sentinel://[[user]:password@]host:port[,host:port...]/<master name>[/db] or"
    " redis+cluster://[[user]:password@]host:port[,host:port...]"
)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("the database must be a number, not {!r}".format(text))
    return int(text)


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read ``redis://[[user]:password@]host[:port][/db]`` or
    ``unix:/path/to/redis.sock[?db=N][&password=...]``.

    :raise ValueError: with the reason, if ``url`` is neither.
    """
    if url.startswith("redis+sentinel://"):
        return _parse_sentinel_url(url)
    if url.startswith("redis+cluster://"):
        return _parse_cluster_url(url)
    if url.startswith("unix:"):
        path, _, query = url[len("unix:") :].partition("?")
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise ValueError(
                "a unix: address needs an absolute socket path, e.g. {}".format(_URL_FORMS)
            )
        params = parse_qs(query, keep_blank_values=True)
        unknown = set(params) - {"db", "password"}
        if unknown:
            raise ValueError(
                "unknown parameter {!r} (db and password are known)".format(sorted(unknown)[0])
            )
        db = _db(params["db"][-1]) if "db" in params else 0
        password = params["password"][-1] if "password" in params else None
        return RedisAddress(path=unquote(path), db=db, password=password or None)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError("{} (expected {})".format(e, _URL_FORMS)) from None
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("expected {}".format(_URL_FORMS))
    if parts.query or parts.fragment:
        raise ValueError("unexpected query or fragment in {!r}".format(redact_url(url)))
    db_path = parts.path.strip("/")
    return RedisAddress(
        host=parts.hostname,
        port=port or 6379,
        db=_db(db_path) if db_path else 0,
        password=unquote(parts.password) if parts.password else None,
        username=unquote(parts.username) if parts.username else None,
    )


def _credentials_and_hosts(rest: str, url: str, default_port: int):
    """
    ``[[user]:password@]host:port[,host:port...]``: the credentials and
    the hosts (``default_port`` where a port is left out).
    """
    credentials, at, hosts = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    found = []
    for part in hosts.split(","):
        try:
            parsed = urlsplit("//" + part)
            port = parsed.port or default_port
        except ValueError as e:
            raise ValueError("bad host {!r}: {}".format(part, e)) from None
        if not parsed.hostname:
            raise ValueError("a host is missing, e.g. {}".format(_URL_FORMS))
        found.append((parsed.hostname, port))
    return username, password, tuple(found)


def _parse_cluster_url(url: str) -> RedisAddress:
    """
    ``redis+cluster://[[user]:password@]host:port[,host:port...]``: nodes
    of the cluster to ask for its slots (port 6379 if left out); a cluster
    has one database.
    """
    rest = url[len("redis+cluster://") :]
    if "?" in rest or "#" in rest:
        raise ValueError("unexpected query or fragment in {!r}".format(redact_url(url)))
    rest = rest.rstrip("/")
    if "/" in rest.rpartition("@")[2]:
        raise ValueError("a Redis Cluster has one database: no /db in {!r}".format(redact_url(url)))
    username, password, nodes = _credentials_and_hosts(rest, url, 6379)
    return RedisAddress(password=password, username=username, cluster=nodes)


def _parse_sentinel_url(url: str) -> RedisAddress:
    """
    ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master>[/db]``:
    the sentinels (port 26379 if left out), the master's name, the database;
    the credentials are the master's.
    """
    rest = url[len("redis+sentinel://") :]
    if "?" in rest or "#" in rest:
        raise ValueError("unexpected query or fragment in {!r}".format(redact_url(url)))
    credentials, at, after = rest.rpartition("@")
    hosts, _, path = after.partition("/")
    username, password, sentinels = _credentials_and_hosts(
        credentials + at + hosts, url, 26379
    )
    master, _, db = path.partition("/")
    if not master:
        raise ValueError("the master's name is missing, e.g. {}".format(_URL_FORMS))
    return RedisAddress(
        db=_db(db.strip("/")) if db.strip("/") else 0,
        password=password,
        username=username,
        sentinels=sentinels,
        master=unquote(master),
    )
