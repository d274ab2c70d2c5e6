"""
Tests for :mod:`broadcaster.http.fetch` and the ``image_url`` request: real
downloads from a local twisted.web server through a real server (on
127.0.0.1, hence ``--allow-private-fetch`` except where the refusal itself
is tested), the address checks and pinning against a memory reactor, and
the fetcher's edge cases with ``StubTreq``.
"""

from __future__ import annotations

import io
import json
from typing import List

from PIL import Image
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from broadcaster.http.fetch import (
    FetchError,
    ForbiddenAddress,
    ImageFetcher,
    PinnedEndpoint,
    PinningEndpointFactory,
    address_problem,

    url_problem,
)
from broadcaster.core.fetching import describe_url
from broadcaster.core.imaging import NormalisedImage
from broadcaster.protocols.wire import BadRequest, parse_client_message
from tests.support import connect_client, start_server, wait_for
from tests.http.test_webhooks import serve


def png(width: int = 8, height: int = 6) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


class Streaming(Resource):
    """
    A body of ``total`` bytes with no Content-Length, written a chunk per
    reactor turn, noting whether the client hung up first.
    """

    isLeaf = True

    def __init__(self, total: int, chunk: int = 8192) -> None:
        super().__init__()
        self.total = total
        self.chunk = chunk
        self.sent = 0
        self.lost = False

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"image/png")
        request.notifyFinish().addErrback(lambda _: setattr(self, "lost", True))
        self._write(request)
        return NOT_DONE_YET

    def _write(self, request) -> None:
        if self.lost:
            return
        if self.sent >= self.total:
            request.finish()
            return
        request.write(b"\0" * self.chunk)
        self.sent += self.chunk
        reactor.callLater(0, self._write, request)


class ImageSite(Resource):
    """
    ``/image.png``, ``/page`` (HTML), ``/garbage.png`` (not an image),
    ``/hops/N`` (N redirects, then the image), ``/big`` (streams 4 MB),
    ``/to-ftp`` (redirects to ftp:).
    """

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[bytes] = []
        self.big = Streaming(4 * 1024 * 1024)

    def getChild(self, name, request):
        self.requests.append(request.path)
        if name == b"big":
            return self.big
        return self

    def render_GET(self, request):
        path = request.path
        if path == b"/image.png" or path == b"/hops/0":
            request.setHeader(b"Content-Type", b"image/png")
            return png()
        if path == b"/page":
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            return b"<html>no image here</html>"
        if path == b"/garbage.png":
            request.setHeader(b"Content-Type", b"image/png")
            return b"this is not a PNG"
        if path.startswith(b"/hops/"):
            hops = int(path.rsplit(b"/", 1)[1])
            request.redirect("/hops/{}".format(hops - 1).encode())
            return b""
        if path == b"/to-ftp":
            request.redirect(b"ftp://127.0.0.1/image.png")
            return b""
        request.setResponseCode(404)
        return b"not found"


class ImageURLTests(TestCase):
    """
    ``image_url`` through a real server and a real download.
    """

    @inlineCallbacks
    def start(self, *args):
        self.site = ImageSite()
        self.images = serve(self, self.site)
        service, port = yield start_server(self, list(args))
        client = yield connect_client(self, port, json_mode=True)
        welcome = yield client.next_json()
        yield client.next_json()  # its join
        return port, client, welcome["id"]

    @inlineCallbacks
    def ask(self, client, path: str, ref="r1"):
        """Send an image_url for ``path`` on the image site; return the next event."""
        client.send_json({"type": "image_url", "url": self.images.url + path, "ref": ref})
        event = yield client.next_json()
        return event

    @inlineCallbacks
    def test_fetched_image_reaches_json_clients(self):
        """The image is fetched, normalised and sent to every JSON client, the asker included."""
        port, ann, ann_id = yield self.start("--allow-private-fetch")
        bob = yield connect_client(self, port, json_mode=True)
        yield bob.next_json()  # welcome
        yield bob.next_json()  # its join
        yield ann.next_json()  # bob's join
        event = yield self.ask(ann, "/image.png")
        header = yield bob.next_json()
        for received in (event, header):
            self.assertEqual(
                {k: received[k] for k in ("type", "room", "from", "width", "height", "format")},
                {"type": "image", "room": "lobby", "from": ann_id, "width": 8, "height": 6,
                 "format": "png"},
            )
        data, binary = yield bob.next()
        self.assertTrue(binary)
        self.assertEqual(len(data), header["size"])
        self.assertEqual(Image.open(io.BytesIO(data)).size, (8, 6))

    @inlineCallbacks
    def test_oversize_body_is_cut_off_while_streaming(self):
        """A body growing past --max-image-size is refused and its download stopped early."""
        port, client, _ = yield self.start("--allow-private-fetch", "--max-image-size", "100000")
        error = yield self.ask(client, "/big")
        self.assertEqual((error["type"], error["ref"]), ("error", "r1"))
        self.assertIn("larger than the limit of 100000 bytes", error["reason"])
        yield wait_for(lambda: self.site.big.lost, what="the download to be dropped")
        self.assertLess(self.site.big.sent, self.site.big.total)

    @inlineCallbacks
    def test_non_images_are_refused(self):
        """An HTML page and bytes that are not an image both get an error with the ref."""
        port, client, _ = yield self.start("--allow-private-fetch")
        page = yield self.ask(client, "/page", ref=1)
        self.assertEqual(page["ref"], 1)
        self.assertIn("not an image", page["reason"])
        self.assertIn("text/html", page["reason"])
        garbage = yield self.ask(client, "/garbage.png", ref=2)
        self.assertEqual((garbage["type"], garbage["ref"]), ("error", 2))
        self.assertIn("unsupported image format", garbage["reason"])

    @inlineCallbacks
    def test_private_addresses_are_refused_by_default(self):
        """Without --allow-private-fetch a loopback URL is refused before any connection."""
        port, client, _ = yield self.start()
        error = yield self.ask(client, "/image.png")
        self.assertEqual(error["type"], "error")
        self.assertIn("127.0.0.1 is a loopback address", error["reason"])
        self.assertEqual(self.site.requests, [])

    @inlineCallbacks
    def test_at_most_three_redirects(self):
        """Three redirects are followed; a fourth is refused."""
        port, client, _ = yield self.start("--allow-private-fetch")
        image = yield self.ask(client, "/hops/3")
        self.assertEqual(image["type"], "image")
        yield client.next()  # its PNG
        error = yield self.ask(client, "/hops/4")
        self.assertEqual(error["type"], "error")
        self.assertIn("too many redirects", error["reason"])
        self.assertNotIn(b"/hops/0", self.site.requests[-4:])

    @inlineCallbacks
    def test_redirect_to_another_scheme_is_refused(self):
        """A redirect is checked again: to ftp: is refused."""
        port, client, _ = yield self.start("--allow-private-fetch")
        error = yield self.ask(client, "/to-ftp")
        self.assertIn("only http and https", error["reason"])


@implementer(IHostnameResolver)
class FakeResolver:
    """Answers every name with the given addresses."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.asked: List[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.addresses:
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()
        return None


class AddressTests(SynchronousTestCase):
    def test_forbidden_addresses(self):
        """Private, loopback, link-local, multicast, reserved and unspecified addresses fail."""
        for address, what in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("192.168.0.10", "private"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved"),
            ("0.0.0.0", "unspecified"),
            ("100.64.0.1", "not a public"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("fd00::1", "private"),
            ("::ffff:127.0.0.1", "loopback"),
            ("2002:7f00:1::", "loopback"),
            ("64:ff9b::a00:1", "private"),
        ]:
            problem = address_problem(address)
            self.assertIsNotNone(problem, address)
            self.assertIn(what, problem)

    def test_public_addresses_pass(self):
        """Public unicast addresses are allowed."""
        for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
            self.assertIsNone(address_problem(address), address)

    def test_urls(self):
        """Only http(s) URLs with a host and without credentials are fetched; logs show no path."""
        self.assertIsNone(url_problem("https://example.com/a.png?x=1"))
        self.assertIn("only http and https", url_problem("file:///etc/passwd"))
        self.assertIn("no host", url_problem("http:///a.png"))
        self.assertIn("user name or password", url_problem("http://u:p@example.com/"))
        self.assertIsNone(url_problem("http://u:p@example.com/", allow_credentials=True))
        self.assertEqual(
            describe_url("https://u:p@hooks.example:8443/secret/path?token=1"),
            "https://hooks.example:8443",
        )


class PinningTests(SynchronousTestCase):
    def test_connects_to_the_checked_address(self):
        """The connection goes to the resolved, checked address, not to a second lookup."""
        memory = MemoryReactorClock()
        resolver = FakeResolver("93.184.216.34")
        endpoint = PinnedEndpoint(memory, resolver, "images.example", 80, address_problem)
        endpoint.connect(Factory())
        self.assertEqual(resolver.asked, ["images.example"])
        self.assertEqual([c[:2] for c in memory.tcpClients], [("93.184.216.34", 80)])

    def test_any_forbidden_address_refuses_the_host(self):
        """A name that also resolves to a private address is refused outright."""
        memory = MemoryReactorClock()
        resolver = FakeResolver("93.184.216.34", "10.0.0.7")
        endpoint = PinnedEndpoint(memory, resolver, "rebind.example", 80, address_problem)
        failure = self.failureResultOf(endpoint.connect(Factory()), ForbiddenAddress)
        self.assertEqual(
            str(failure.value),
            "refused to connect: rebind.example resolves to 10.0.0.7 is a private address",
        )
        self.assertEqual(memory.tcpClients, [])

    def test_allowed_without_a_check(self):
        """With --allow-private-fetch (no check) private addresses are connected to."""
        memory = MemoryReactorClock()
        endpoint = PinnedEndpoint(memory, FakeResolver("127.0.0.1"), "localhost", 8080, None)
        endpoint.connect(Factory())
        self.assertEqual([c[:2] for c in memory.tcpClients], [("127.0.0.1", 8080)])

    def test_factory_pins_every_scheme_it_accepts(self):
        """http and https URLs get pinned endpoints; other schemes are refused."""
        memory = MemoryReactorClock()
        resolver = FakeResolver("93.184.216.34")
        endpoints = PinningEndpointFactory(memory, resolver=resolver)
        endpoints.endpointForURI(URI.fromBytes(b"https://images.example/a.png")).connect(Factory())
        self.assertEqual([c[:2] for c in memory.tcpClients], [("93.184.216.34", 443)])
        self.assertRaises(
            SchemeNotSupported, endpoints.endpointForURI, URI.fromBytes(b"ftp://images.example/")
        )


class Silent(Resource):
    isLeaf = True

    def render_GET(self, request):
        return NOT_DONE_YET


class Fixed(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes = b"image/png") -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request):
        request.setHeader(b"Content-Type", self.content_type)
        return self.body


class FetcherTests(SynchronousTestCase):
    """
    :class:`ImageFetcher` with ``StubTreq`` and a ``task.Clock``.
    """

    def fetcher(self, resource, clock=None, **kwargs) -> ImageFetcher:
        decode = lambda data: succeed(NormalisedImage(data, 1, 1, "PNG", len(data)))  # noqa: E731
        return ImageFetcher(
            StubTreq(resource), clock or Clock(), decode, max_size=1000, **kwargs
        )

    def test_timeout(self):
        """A server that does not answer within --fetch-timeout fails the fetch."""
        clock = Clock()
        d = self.fetcher(Silent(), clock, timeout=10).fetch_image("http://images.example/a.png")
        self.assertNoResult(d)
        clock.advance(10)
        failure = self.failureResultOf(d, FetchError)
        self.assertEqual(str(failure.value), "no answer within 10 s")

    def test_declared_length_over_the_limit(self):
        """A Content-Length above the limit is refused without reading the body."""
        d = self.fetcher(Fixed(b"x" * 2000)).fetch_image("http://images.example/a.png")
        failure = self.failureResultOf(d, FetchError)
        self.assertIn("larger than the limit of 1000 bytes", str(failure.value))

    def test_success(self):
        """A small image body is handed to the decoder."""
        d = self.fetcher(Fixed(b"x" * 10)).fetch_image("http://images.example/a.png")
        self.assertEqual(self.successResultOf(d).png, b"x" * 10)

    def test_concurrency_limit(self):
        """Beyond max_concurrent downloads under way, more are refused at once."""
        fetcher = self.fetcher(Silent(), max_concurrent=1)
        first = fetcher.fetch_image("http://images.example/1.png")
        failure = self.failureResultOf(fetcher.fetch_image("http://images.example/2.png"))
        self.assertIn("busy", str(failure.value))
        fetcher.startService()
        fetcher.stopService()
        self.assertIn("shutting down", str(self.failureResultOf(first, FetchError).value))


class WireTests(SynchronousTestCase):
    def test_image_url_is_parsed(self):
        """image_url needs a url string of at most 2048 characters."""
        request = parse_client_message(
            json.dumps({"type": "image_url", "url": "https://x.example/a.png", "ref": 3}).encode()
        )
        self.assertEqual(request["url"], "https://x.example/a.png")
        self.assertEqual(request["ref"], 3)
        for bad in ({"type": "image_url"}, {"type": "image_url", "url": 5},
                    {"type": "image_url", "url": "https://x.example/" + "a" * 2048}):
            self.assertRaises(BadRequest, parse_client_message, json.dumps(bad).encode())
