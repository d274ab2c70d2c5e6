"""
Where Redis is: ``--redis`` URLs (``redis://``, ``unix:``) parsed into a
:class:`RedisAddress`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

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

    def endpoint(self, reactor) -> IStreamClientEndpoint:
        """
        A client endpoint that connects to it.
        """
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
        host = "[{}]".format(self.host) if ":" in self.host else self.host
        return "redis://{}{}:{}/{}".format(user, host, self.port, self.db)


def redact_url(url: str) -> str:
    """
    ``url`` as given, its password (after ``user:`` or in ``password=``)
    replaced by ``***``: for an error about a URL that may not parse.
    """
    url = re.sub(r"(password=)[^&#]*", r"\1***", url)
    return re.sub(r"^([^/]*//[^/@:]*:)[^/]*@", r"\1***@", url)


_URL_FORMS = "redis://[[user]:password@]host[:port][/db] or unix:/path/to/redis.sock[?db=N]"


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
