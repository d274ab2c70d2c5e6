"""
What every HTTP request the server makes shares (the image URL downloads of
:mod:`broadcaster.http.fetch`, the ``--auth-url`` questions of
:mod:`broadcaster.http.auth`, the webhooks of :mod:`broadcaster.http.webhooks`):
its ``User-Agent``, a deadline for the whole exchange, a response body read
up to a limit and no further, and a short reason for a failure, fit for
logs and for the client it concerns.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import treq
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from broadcaster import __version__
from broadcaster.core.fetching import FetchError

#: The ``User-Agent`` of every request the server makes.
USER_AGENT = "broadcaster/{}".format(__version__).encode("ascii")


class BodyTooLarge(FetchError):
    """
    A response body was larger than allowed; the transfer was cut off.
    """


def exchange(
    client,
    clock: IReactorTime,
    method: str,
    url: str,
    timeout: float,
    limit: int,
    headers: Dict[bytes, List[bytes]],
    data: Optional[bytes] = None,
) -> Deferred:
    """
    One request the server makes and its answer, as the sign-in checks
    make them: no redirect followed (a redirect is an answer), the whole
    exchange within ``timeout`` seconds, the body read up to ``limit``
    bytes, our ``User-Agent``.

    :param client: a treq-like client (``get``, ``post``).
    :return: a Deferred firing with ``(status, body)``, or failing with
        :class:`TimeoutError`, :class:`BodyTooLarge` or what the network
        did (see :func:`describe_http_failure`).
    """
    d = getattr(client, method)(
        url,
        data=data,
        headers={b"User-Agent": [USER_AGENT], **headers},
        allow_redirects=False,
        unbuffered=True,
    )
    d.addCallback(
        lambda response: read_body(response, limit).addCallback(
            lambda body: (response.code, body)
        )
    )
    return with_timeout(d, timeout, clock)


def with_timeout(d: Deferred, timeout: float, clock: IReactorTime) -> Deferred:
    """
    Cancel ``d`` after ``timeout`` seconds, like :meth:`Deferred.addTimeout`,
    but turn *any* failure after that moment into :class:`TimeoutError`:
    treq reports a cancelled request as ``ResponseNeverReceived`` (or
    ``ResponseFailed``), not ``CancelledError``.

    :return: ``d``.
    """
    expired: List[bool] = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    call = clock.callLater(timeout, expire)

    def done(result):
        if call.active():
            call.cancel()
        if expired and isinstance(result, Failure):
            return Failure(TimeoutError(timeout, "the request"))
        return result

    return d.addBoth(done)


# Response bodies


class _CapturingResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """
    Remembers the protocol the body goes to, so its transport can be
    closed to stop a transfer that is no longer wanted.
    """

    body_protocol = None

    def deliverBody(self, protocol) -> None:
        self.body_protocol = protocol
        self.original.deliverBody(protocol)


def read_body(response: IResponse, limit: int) -> Deferred:
    """
    Read a response's body with :func:`treq.collect`, refusing to hold more
    than ``limit`` bytes.

    Use an unbuffered response (``unbuffered=True``), or treq keeps a copy
    of the whole body whatever the limit.

    :return: a Deferred firing with the body, or failing with
        :class:`BodyTooLarge` as soon as more than ``limit`` bytes have
        arrived; then, or if the Deferred is cancelled (say, by a
        timeout), the connection is closed and the transfer stops.
    """
    length = response.length
    if length is not UNKNOWN_LENGTH and length > limit:
        discard(response)
        return fail(
            BodyTooLarge(
                "the response is {} bytes, larger than the limit of {} bytes".format(length, limit)
            )
        )
    chunks: List[bytes] = []
    received = [0]

    def collect(data: bytes) -> None:
        received[0] += len(data)
        if received[0] > limit:
            # treq.collect closes the connection when this raises.
            raise BodyTooLarge(
                "the response is larger than the limit of {} bytes".format(limit)
            )
        chunks.append(data)

    capture = _CapturingResponse(response)

    def stop(_: Deferred) -> None:
        transport = getattr(capture.body_protocol, "transport", None)
        if transport is not None:
            transport.loseConnection()

    result: Deferred = Deferred(stop)
    collected = treq.collect(capture, collect)
    collected.addCallbacks(lambda _: result.callback(b"".join(chunks)), result.errback)
    return result


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass


def discard(response: IResponse) -> None:
    """
    Close the connection of a response whose body is not wanted, rather
    than read it.
    """
    response.deliverBody(_Discard())


def describe_http_failure(failure: Failure, timeout: float) -> str:
    """
    A short reason for a failed request, fit for logs and clients: no
    tracebacks, no nested failure reprs.

    :param timeout: the time limit, for the message when it was reached.
    """
    if failure.check(TimeoutError):
        return "no answer within {:g} s".format(timeout)
    if failure.check(FetchError):
        return str(failure.value)
    if failure.check(DNSLookupError):
        return str(failure.value.args[0]) if failure.value.args else "could not resolve the host"
    if failure.check(ConnectError):
        return "could not connect: {}".format(failure.getErrorMessage())
    if failure.check(ResponseFailed, RequestTransmissionFailed):
        # Also ResponseNeverReceived: the connection broke, or TLS
        # verification failed, before a complete answer.
        return "the connection failed before a complete answer"
    if failure.check(RequestGenerationFailed):
        return "the request could not be sent"
    if failure.check(SchemeNotSupported):
        return "only http and https URLs are allowed"
    return failure.getErrorMessage() or failure.type.__name__
