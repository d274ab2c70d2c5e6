"""
Sign-in through an HTTP service of the operator's (``--auth-url URL``).

Wire format.  During each WebSocket handshake (after the Origin check, so
a foreign page never reaches the service) the server POSTs
``Content-Type: application/json``::

    {"peer": "tcp4:203.0.113.5:50122", "path": "/", "query": {"name": ["ann"]},
     "origin": "https://chat.example.com" or null,
     "headers": {"authorization": "...", "cookie": "..."}}

``headers`` holds only those of the two the client sent.  The answer:

- 2xx: accepted.  An optional JSON body ``{"user": "...", "name": "...",
  "rooms": ...}`` (each optional) is the client's identity: ``name`` is its
  display name (it beats ``?name=``, and ``hello`` cannot change it),
  ``user`` appears in its ``welcome``, in webhook events and in the logs,
  and ``rooms`` says what it may do in which room, as a signed token's
  claim does (:mod:`broadcaster.core.permissions`; none: everything).
- 401 or 403: refused; the handshake is answered 403.
- anything else, no answer within ``--auth-timeout``, a connection error or
  a malformed 2xx body: the handshake is answered 503 and an error logged.
  It fails closed: nobody gets in while the service is down.

Credentials (the two headers, and the query, which may carry a token) are
sent to the service and nowhere else: never logged.
"""

from __future__ import annotations

import json
from typing import Any, List, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from broadcaster.core.identity import MAX_USER_LENGTH, AuthDenied, AuthUnavailable, Identity
from broadcaster.core.fetching import describe_url
from broadcaster.http.outgoing import describe_http_failure, exchange
from broadcaster.core.names import InvalidName, check_display_name, check_user_id
from broadcaster.core.permissions import parse_grants

#: The largest answer body read from the auth service.
MAX_ANSWER_SIZE = 64 * 1024

#: The request headers passed on to the auth service.
FORWARDED_HEADERS = ("authorization", "cookie")



class Authenticator(Service):
    """
    Asks the ``--auth-url`` service about each handshake.

    A service so that its kept-alive connections are closed when the server
    stops.

    :param client: a treq-like client (``post``).
    :param timeout: seconds for the whole exchange (``--auth-timeout``).
    :param max_name_length: the longest display name, as for ``hello``.
    :param pool: the ``HTTPConnectionPool`` behind ``client``, if any.
    """

    _log = Logger()

    def __init__(
        self,
        url: str,
        client,
        clock: IReactorTime,
        timeout: float = 5.0,
        max_name_length: int = 32,
        pool=None,
    ) -> None:
        self.url = url
        self.target = describe_url(url)
        self._client = client
        self._clock = clock
        self.timeout = timeout
        self.max_name_length = max_name_length
        self._pool = pool

    def authenticate(
        self,
        peer: str,
        path: str,
        query: Mapping[str, List[str]],
        origin: Optional[str],
        headers: Mapping[str, str],
    ) -> Deferred:
        """
        Ask the service about one handshake.

        :param headers: the request's headers, names in lower case; only
            :data:`FORWARDED_HEADERS` are sent on.
        :return: a Deferred firing with an :class:`Identity`, or failing
            with :class:`AuthDenied` or :class:`AuthUnavailable` (or
            ``CancelledError`` if cancelled).
        """
        body = {
            "peer": peer,
            "path": path,
            "query": {key: list(values) for key, values in query.items()},
            "origin": origin,
            "headers": {name: headers[name] for name in FORWARDED_HEADERS if name in headers},
        }
        d = exchange(
            self._client,
            self._clock,
            "post",
            self.url,
            self.timeout,
            MAX_ANSWER_SIZE,
            {b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]},
            data=json.dumps(body).encode("utf-8"),
        )
        d.addCallbacks(self._answered, self._failed)
        return d

    def _answered(self, answer) -> Identity:
        code, body = answer
        if code in (401, 403):
            raise AuthDenied(code)
        if not 200 <= code < 300:
            raise AuthUnavailable("the auth service answered HTTP {}".format(code))
        return self._identity(body)

    def _identity(self, body: bytes) -> Identity:
        if not body.strip():
            return Identity()
        try:
            answer: Any = json.loads(body)
        except ValueError:
            raise AuthUnavailable("the auth service accepted, but its answer is not JSON") from None
        if not isinstance(answer, dict):
            raise AuthUnavailable("the auth service accepted, but its answer is not a JSON object")
        user = answer.get("user")
        if user is not None:
            try:
                user = check_user_id(user, MAX_USER_LENGTH)
            except InvalidName as e:
                raise AuthUnavailable(
                    'the auth service accepted, but its "user" is unusable: {}'.format(e)
                ) from None
        name = answer.get("name")
        if name is not None:
            try:
                name = check_display_name(name, self.max_name_length)
            except InvalidName as e:
                raise AuthUnavailable(
                    'the auth service accepted, but its "name" is unusable: {}'.format(e)
                ) from None
        rooms = answer.get("rooms")
        try:
            parse_grants(rooms)
        except ValueError as e:
            raise AuthUnavailable(
                'the auth service accepted, but its "rooms" is unusable: {}'.format(e)
            ) from None
        return Identity(user=user, name=name, rooms=rooms)

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(AuthDenied, AuthUnavailable, CancelledError):
            return failure
        return Failure(AuthUnavailable(describe_http_failure(failure, self.timeout)))

    def stopService(self):
        super().stopService()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None
