"""
Images fetched from URLs that JSON clients send.

Wire format (JSON protocol, see :mod:`broadcaster.protocols.wire`): a client sends
``{"type": "image_url", "url": "https://...", "ref": ...}``.  The server
downloads the image, checks and normalises it exactly as it does a frame
from the image port (:class:`broadcaster.protocols.images.DecoderPool`), and
broadcasts it to the lobby as an ``image`` event from that client.  If it
cannot, that client alone gets ``{"type": "error", "reason": ..., "ref":
...}``.

A URL handed to a server by strangers is an invitation to server-side
request forgery, so the download is fenced in:

- only ``http`` and ``https``, without credentials in the URL;
- at most :data:`MAX_REDIRECTS` redirects, each target checked again;
- ``--fetch-timeout`` bounds the whole download, redirects included;
- ``--max-image-size`` is enforced while the body streams in: a larger
  ``Content-Length`` is refused before anything is read, and a body that
  grows past the limit is cut off there;
- host names are resolved with the reactor's (non-blocking) resolver and
  the connection is refused if any address is private, loopback,
  link-local, multicast, reserved, unspecified or otherwise not public
  (unless ``--allow-private-fetch``).  The connection then goes to the very
  address that was checked, with the URL's host name in ``Host`` and in
  TLS (SNI and certificate verification): the check and the connection
  cannot be told different answers (DNS rebinding).  This happens in the
  endpoint the HTTP client connects with (:class:`PinningEndpointFactory`),
  so every redirect hop is checked the same way.

All HTTP goes through an injected treq-like client (``treq``, an
``HTTPClient``, or ``treq.testing.StubTreq`` in unit tests).
"""

from __future__ import annotations

import ipaddress
from typing import Callable, List, Optional, Set
from urllib.parse import urljoin, urlsplit

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from broadcaster.core.fetching import FetchError
from broadcaster.core.imaging import ImageError, NormalisedImage
from broadcaster.http.outgoing import (
    USER_AGENT,
    BodyTooLarge,
    describe_http_failure,
    discard,
    read_body,
    with_timeout,
)

#: Redirects followed for one image URL.
MAX_REDIRECTS = 3

#: Downloads the whole server may have under way at once.
MAX_CONCURRENT_FETCHES = 16

_REDIRECT_CODES = (301, 302, 303, 307, 308)

#: Content types accepted besides ``image/*`` (and no Content-Type at all):
#: the decoder has the last word either way.
_BINARY_TYPES = (b"application/octet-stream", b"binary/octet-stream")

class ForbiddenAddress(FetchError):
    """
    The host resolves to an address the server must not connect to.
    """


# URLs


def url_problem(url: str, allow_credentials: bool = False) -> Optional[str]:
    """
    Why ``url`` is not an absolute ``http`` or ``https`` URL with a host, or
    ``None`` if it is.

    :param allow_credentials: accept ``user:password@`` in the URL (for
        URLs the operator configures; never for clients' URLs).
    """
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError for a port that is not a number
    except ValueError as e:
        return "not a valid URL ({})".format(e)
    if parts.scheme.lower() not in ("http", "https"):
        return "only http and https URLs are allowed, not {!r}".format(parts.scheme or url)
    if not parts.hostname:
        return "the URL has no host"
    if not allow_credentials and (parts.username is not None or parts.password is not None):
        return "URLs with a user name or password are not allowed"
    return None


# Addresses


_NAT64 = ipaddress.ip_network("64:ff9b::/96")

_FORBIDDEN = (
    ("is_unspecified", "an unspecified"),
    ("is_loopback", "a loopback"),
    ("is_link_local", "a link-local"),
    ("is_multicast", "a multicast"),
    ("is_reserved", "a reserved"),
    ("is_private", "a private"),
)


def address_problem(address: str) -> Optional[str]:
    """
    Why the server must not connect to the IP ``address`` on a client's
    behalf, or ``None`` if it may (a public unicast address).

    IPv4 addresses embedded in IPv6 ones (IPv4-mapped, 6to4, Teredo, NAT64)
    are checked too: ``::ffff:127.0.0.1`` is the loopback address.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "{!r} is not an IP address".format(address)
    # Embedded IPv4 addresses first: they say best where a connection goes.
    candidates: List = []
    if ip.version == 6:
        candidates.extend(a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None)
        if ip.teredo is not None:
            candidates.extend(ip.teredo)
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    candidates.append(ip)
    for candidate in candidates:
        for attribute, what in _FORBIDDEN:
            if getattr(candidate, attribute):
                return "{} is {} address".format(address, what)
        if not candidate.is_global:
            return "{} is not a public address".format(address)
    return None


def resolve(resolver: IHostnameResolver, host: str, port: int) -> Deferred:
    """
    Resolve ``host`` with a non-blocking resolver (the reactor's
    ``nameResolver`` runs ``getaddrinfo`` in a thread).

    :return: a Deferred firing with a list of IP address strings, or
        failing with :class:`DNSLookupError` if there are none.
    """
    d: Deferred = Deferred()
    addresses: List[str] = []

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolution) -> None:
            pass

        def addressResolved(self, address) -> None:
            if address.host not in addresses:
                addresses.append(address.host)

        def resolutionComplete(self) -> None:
            if d.called:  # cancelled meanwhile
                return
            if addresses:
                d.callback(addresses)
            else:
                d.errback(DNSLookupError("could not resolve {}".format(host)))

    resolver.resolveHostName(
        Receiver(), host, port, addressTypes=[IPv4Address, IPv6Address], transportSemantics="TCP"
    )
    return d


@implementer(IStreamClientEndpoint)
class PinnedEndpoint:
    """
    Connects to ``host``:``port`` at an address that passed ``check``.

    The host name is resolved once; if ``check`` objects to *any* of its
    addresses the connection is refused (a name that also points inside the
    network is not to be trusted), otherwise the addresses are tried in
    order.  The address connected to is the one checked.

    :param check: returns why an address is forbidden, or ``None``;
        ``None`` instead of a function allows every address.
    """

    def __init__(
        self,
        reactor,
        resolver: IHostnameResolver,
        host: str,
        port: int,
        check: Optional[Callable[[str], Optional[str]]],
        timeout: float = 30,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._check = check
        self._timeout = timeout

    def connect(self, factory) -> Deferred:
        d = resolve(self._resolver, self._host, self._port)
        d.addCallback(self._checked)
        d.addCallback(self._connect, factory)
        return d

    def _checked(self, addresses: List[str]) -> List[str]:
        if self._check is not None:
            for address in addresses:
                problem = self._check(address)
                if problem is not None:
                    if address == self._host:
                        raise ForbiddenAddress("refused to connect: {}".format(problem))
                    raise ForbiddenAddress(
                        "refused to connect: {} resolves to {}".format(self._host, problem)
                    )
        return addresses

    @inlineCallbacks
    def _connect(self, addresses: List[str], factory):
        failure: Optional[Failure] = None
        for address in addresses:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = kind(self._reactor, address, self._port, timeout=self._timeout)
            try:
                protocol = yield endpoint.connect(factory)
            except ConnectError:
                failure = Failure()
                continue
            return protocol
        assert failure is not None
        failure.raiseException()


@implementer(IAgentEndpointFactory)
class PinningEndpointFactory:
    """
    Endpoints for an :class:`Agent` that connect only to addresses
    ``check`` allows, pinned as :class:`PinnedEndpoint` explains.  HTTPS
    is verified against the URL's host name, as :class:`Agent` does.

    :param resolver: default: the reactor's ``nameResolver``.
    """

    def __init__(
        self,
        reactor,
        check: Optional[Callable[[str], Optional[str]]] = address_problem,
        resolver: Optional[IHostnameResolver] = None,
        connect_timeout: float = 30,
        tls_policy=None,
    ) -> None:
        self._reactor = reactor
        self._check = check
        self._resolver = resolver
        self._connect_timeout = connect_timeout
        self._tls = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported("unsupported scheme: {!r}".format(uri.scheme))
        resolver = self._resolver if self._resolver is not None else self._reactor.nameResolver
        endpoint = PinnedEndpoint(
            self._reactor,
            resolver,
            uri.host.decode("ascii"),
            uri.port,
            self._check,
            self._connect_timeout,
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def fetch_client(reactor, allow_private: bool = False, connect_timeout: float = 30) -> HTTPClient:
    """
    The treq client for image URLs: connections pinned to checked
    addresses (every address allowed with ``allow_private``), not kept
    alive (each fetch is to wherever a client pointed).
    """
    endpoints = PinningEndpointFactory(
        reactor, None if allow_private else address_problem, connect_timeout=connect_timeout
    )
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=pool))


#: Failures of the network or of the far end, as opposed to bugs.
_NETWORK_ERRORS = (
    TimeoutError,
    DNSLookupError,
    ConnectError,
    ResponseFailed,
    RequestTransmissionFailed,
    RequestGenerationFailed,
    SchemeNotSupported,
)


# Image URLs


class ImageFetcher(Service):
    """
    Downloads images for ``image_url`` requests and normalises them with
    ``decode`` (the image port's :class:`~broadcaster.protocols.images.DecoderPool`).

    A service so that downloads still under way when the server stops are
    cancelled rather than left holding connections.

    :param client: a treq-like client (``get``); in production
        :func:`fetch_client`, whose connections refuse private addresses.
    :param decode: takes image bytes, returns a Deferred firing with a
        :class:`NormalisedImage` or failing with :class:`ImageError`.
    :param max_size: the largest body accepted, in bytes (``--max-image-size``).
    :param timeout: seconds for the whole download (``--fetch-timeout``).
    """

    _log = Logger()

    def __init__(
        self,
        client,
        clock: IReactorTime,
        decode: Callable[[bytes], Deferred],
        max_size: int,
        timeout: float = 10.0,
        max_redirects: int = MAX_REDIRECTS,
        max_concurrent: int = MAX_CONCURRENT_FETCHES,
    ) -> None:
        self._client = client
        self._clock = clock
        self._decode = decode
        self.max_size = max_size
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.max_concurrent = max_concurrent
        self._in_flight: Set[Deferred] = set()
        self._stopping = False
        self.fetched = 0
        self.failed = 0

    def register_metrics(self, collector) -> None:
        """
        Report counts on ``/metrics`` (a :class:`~broadcaster.http.metrics.StatsCollector`).
        """
        collector.add_gauge(
            "broadcaster_image_url_fetches",
            "Images fetched for image_url requests and broadcast, since start.",
            lambda: self.fetched,
        )
        collector.add_gauge(
            "broadcaster_image_url_failures",
            "image_url requests refused or failed (download or decoding), since start.",
            lambda: self.failed,
        )

    def fetch_image(self, url: str) -> Deferred:
        """
        Download the image at ``url`` and normalise it.

        :return: a Deferred firing with a :class:`NormalisedImage`, or
            failing with :class:`FetchError` or :class:`ImageError`, whose
            ``str()`` is fit to send to the client.
        """
        if len(self._in_flight) >= self.max_concurrent:
            self.failed += 1
            return fail(FetchError("the server is busy fetching other images; try again later"))
        d = self.fetch(url)
        self._in_flight.add(d)

        def done(result):
            self._in_flight.discard(d)
            return result

        d.addBoth(done)
        d.addCallback(self._decode)
        d.addCallbacks(self._succeeded, self._failed)
        return d

    def _succeeded(self, image: NormalisedImage) -> NormalisedImage:
        self.fetched += 1
        return image

    def _failed(self, failure: Failure) -> Failure:
        self.failed += 1
        if failure.check(ImageError, FetchError):
            return failure
        if self._stopping or failure.check(CancelledError):
            # Cancelled by stopService: treq reports it as a broken connection.
            return Failure(FetchError("the server is shutting down"))
        if failure.check(*_NETWORK_ERRORS):
            return Failure(FetchError(describe_http_failure(failure, self.timeout)))
        if failure.check(ValueError):
            # hyperlink and IDNA refusing a URL that urlsplit let through.
            return Failure(FetchError("not a valid URL"))
        self._log.failure("fetching an image failed unexpectedly", failure)
        return Failure(FetchError("the server could not fetch this image"))

    def fetch(self, url: str) -> Deferred:
        """
        Download the bytes at ``url``, following up to ``max_redirects``
        redirects, within ``timeout`` seconds and ``max_size`` bytes.

        :return: a Deferred firing with the body; cancelling it stops the download.
        """
        return with_timeout(self._download(url), self.timeout, self._clock)

    @inlineCallbacks
    def _download(self, url: str):
        for _hop in range(self.max_redirects + 1):
            problem = url_problem(url)
            if problem is not None:
                raise FetchError(problem)
            response = yield self._client.get(
                url,
                headers={b"Accept": [b"image/*"], b"User-Agent": [USER_AGENT]},
                allow_redirects=False,
                unbuffered=True,
            )
            if response.code in _REDIRECT_CODES:
                location = response.headers.getRawHeaders(b"location")
                discard(response)
                if not location:
                    raise FetchError(
                        "a redirect (HTTP {}) without a Location".format(response.code)
                    )
                url = urljoin(url, location[0].decode("latin-1"))
                continue
            if response.code != 200:
                discard(response)
                raise FetchError("the image's server answered HTTP {}".format(response.code))
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            media_type = content_type.split(b";")[0].strip().lower()
            claimed = media_type and not media_type.startswith(b"image/")
            if claimed and media_type not in _BINARY_TYPES:
                discard(response)
                raise FetchError(
                    "not an image: the server says it is {}".format(
                        media_type.decode("latin-1")[:100]
                    )
                )
            try:
                body = yield read_body(response, self.max_size)
            except BodyTooLarge:
                raise FetchError(
                    "the image is larger than the limit of {} bytes".format(self.max_size)
                ) from None
            if not body:
                raise FetchError("the image's server sent an empty body")
            return body
        raise FetchError("too many redirects (more than {})".format(self.max_redirects))

    def stopService(self) -> None:
        super().stopService()
        self._stopping = True
        for d in list(self._in_flight):
            d.cancel()
