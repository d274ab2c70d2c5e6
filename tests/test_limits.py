"""
Per-client limits: slow consumers, message rate, connection counts,
keepalive, compression and the open files limit.  Each limit is crossed by
a real client while another client keeps receiving everything.
"""

import base64
import io
import json
import os
import resource

from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from PIL import Image

from broadcaster.core.flow import Limits, RateLimit, TokenBucket
from broadcaster.protocols.origin import OriginPolicy
from broadcaster.service.listening import raise_open_files_limit
from broadcaster.service.tap import Options
from broadcaster.protocols.websocket import BroadcastServerFactory
from tests.support import (
    immediate_hub,
    RecordingClientProtocol,
    close_client,
    connect_client,
    assert_refused_503,
    FrameClient,
    connect_plain_clients,
    connect_raw,
    port_of,
    start_server,
    wait_for,
)


def warnings_containing(logged, fragment):
    return [
        e for e in logged if e["log_level"] == LogLevel.warn and fragment in e.get("log_format", "")
    ]


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """A full bucket allows a burst, then one message per 1/rate seconds."""
        clock = Clock()
        bucket = TokenBucket(clock, rate=2, burst=3)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        clock.advance(0.5)
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 3)

    def test_zero_rate_is_unlimited(self):
        """--rate 0 lets everything through."""
        bucket = TokenBucket(Clock(), rate=0, burst=1)
        self.assertTrue(all(bucket.take() for _ in range(10000)))

    def test_abuse_is_flooding_past_the_burst(self):
        """More than burst refusals in a row make a client abusive; one accepted message resets it."""
        clock = Clock()
        limit = RateLimit(clock, rate=1, burst=2)
        results = [limit.allow() for _ in range(5)]
        self.assertEqual(results, [True, True, False, False, False])
        self.assertTrue(limit.abusive)
        clock.advance(1)
        self.assertTrue(limit.allow())
        self.assertFalse(limit.abusive)


class StalledReader(Protocol):
    """A WebSocket client that completes the handshake and then never reads."""

    def connectionMade(self):
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )

    def dataReceived(self, data):
        # Got the 101 (and maybe more): stop reading, like a frozen phone.
        self.transport.pauseProducing()

    def connectionLost(self, reason):
        self.lost = True


class Silent(Protocol):
    """A TCP client that connects and says nothing."""

    lost = False

    def connectionLost(self, reason):
        self.lost = True


class SlowConsumerTests(TestCase):
    @inlineCallbacks
    def test_stalled_reader_is_closed_and_others_get_everything(self):
        """A client that stops reading during a 100 MB flood is closed as a
        slow consumer; the server never queues much more than --max-buffer
        for it; the reading client gets every message."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, port = yield start_server(
            self,
            ["--rate", "0", "--max-buffer", "262144", "--max-message-size", "65536",
             "--max-image-size", "262144"],
        )
        (reader, _), (flooder, _) = yield connect_plain_clients(self, port, 2)
        stalled = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(StalledReader)
        )
        self.addCleanup(stalled.transport.abortConnection)
        yield wait_for(lambda: len(service.hub) == 3, what="the stalled client to join")
        yield reader.next_text()
        yield flooder.next_text()
        stalled_member = service.hub.member(service.hub.member_ids()[-1])

        message = b"x" * 60000
        most_queued = 0
        count = 1700  # 100 MB to each recipient
        for i in range(count):
            flooder.sendMessage(b"%05d" % i + message)
            if i % 50 == 0:
                yield deferLater(reactor, 0, lambda: None)
                most_queued = max(most_queued, stalled_member._outbound.queued)
        received = []
        while len(received) < count:
            payload, _ = yield reader.next(timeout=60)
            if not payload.endswith(b"disconnected"):
                received.append(int(payload[:5]))
        self.assertEqual(received, list(range(count)))
        yield wait_for(lambda: warnings_containing(logged, "[SLOW CONSUMER]"), what="the warning")
        (warning,) = warnings_containing(logged, "[SLOW CONSUMER]")
        self.assertEqual(warning["client"], stalled_member.id)
        # Cut when the next write would have passed the budget, not later:
        # what was queued then is within --max-buffer, and never more than
        # one message (plus its framing) beyond it.
        self.assertGreater(warning["queued"] + warning["size"], 262144)
        self.assertLessEqual(warning["queued"], 262144)
        self.assertLessEqual(most_queued, 262144 + 65536 + 14)
        self.assertEqual(service.hub.stats.slow_consumers, 1)

    def test_max_buffer_below_max_message_size_is_refused(self):
        """One message of the largest size must fit: --max-buffer < --max-message-size is an error."""
        error = self.assertRaises(
            UsageError,
            Options().parseOptions,
            ["--max-buffer", "1000", "--max-message-size", "2000", "--max-image-size", "1000"],
        )
        self.assertIn("--max-message-size", str(error))

    def test_max_buffer_below_max_image_size_is_refused(self):
        """A client that keeps up must survive the largest image:
        --max-buffer < --max-image-size is an error."""
        error = self.assertRaises(
            UsageError, Options().parseOptions, ["--max-buffer", "1048576"]
        )
        self.assertIn("--max-image-size 16777216", str(error))
        Options().parseOptions(["--max-buffer", "1048576", "--max-image-size", "1048576"])


class RateLimitTests(TestCase):
    @inlineCallbacks
    def test_excess_dropped_then_flooder_closed(self):
        """Past --burst, a JSON client's messages get an error and are
        dropped; flooding on closes it with 1008; others see only what was
        accepted."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, port = yield start_server(self, ["--rate", "0.001", "--burst", "3"])
        watcher = yield connect_client(self, port)
        yield watcher.next_text()
        flooder = yield connect_client(self, port, json_mode=True)
        yield flooder.next_json()
        yield flooder.next_json()
        yield watcher.next_text()
        for i in range(10):
            flooder.send_json({"type": "message", "text": str(i), "ref": "r{}".format(i)})
        _, code, _ = yield flooder.closed
        self.assertEqual(code, 1008)
        texts = []
        for _ in range(4):
            texts.append((yield watcher.next_text()))
        self.assertEqual(texts[:3], ["0", "1", "2"])
        self.assertRegex(texts[3], "disconnected$")
        errors = [
            p for p, _ in flooder.received if b'"error"' in p and b"rate limit exceeded" in p
        ]
        # Dropped 3, 4 and 5 are answered, each with its ref so the client
        # knows what to resend; the next one, past the burst of 3 refusals,
        # closes the connection.
        self.assertEqual([json.loads(p)["ref"] for p in errors], ["r3", "r4", "r5"])
        self.assertEqual(len(warnings_containing(logged, "[RATE LIMIT]")), 2)


class RateJustUnderTests(TestCase):
    @inlineCallbacks
    def test_a_burst_within_the_limit_is_untouched(self):
        """Exactly --burst messages at once all go through, with no error."""
        _, port = yield start_server(self, ["--rate", "1", "--burst", "20"])
        (sender, _), (watcher, _) = yield connect_plain_clients(self, port, 2)
        for i in range(20):
            sender.send_text(str(i))
        got = []
        for _ in range(20):
            got.append((yield watcher.next_text()))
        self.assertEqual(got, [str(i) for i in range(20)])


class HandshakeTimeoutTests(TestCase):
    @inlineCallbacks
    def test_silent_connection_is_closed_after_the_handshake_timeout(self):
        """A TCP connection that never sends a handshake is closed after
        --open-handshake-timeout, and costs nobody else anything."""
        _, port = yield start_server(self, ["--open-handshake-timeout", "0.5"])
        silent = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(Silent)
        )
        self.addCleanup(silent.transport.abortConnection)
        started = reactor.seconds()
        yield wait_for(lambda: silent.lost, timeout=10, what="the server to hang up")
        self.assertLess(reactor.seconds() - started, 5)
        (a, _), (b, _) = yield connect_plain_clients(self, port, 2)
        a.send_text("fine")
        self.assertEqual((yield b.next_text()), "fine")


class ConnectionLimitTests(TestCase):
    def assertRefused503(self, port):
        return assert_refused_503(self, port)

    @inlineCallbacks
    def test_max_connections(self):
        """The connection over --max-connections gets 503; one leaving makes room."""
        _, port = yield start_server(self, ["--max-connections", "2"])
        (first, _), _ = yield connect_plain_clients(self, port, 2)
        yield self.assertRefused503(port)
        first.sendClose()
        yield first.closed
        yield connect_client(self, port)

    @inlineCallbacks
    def test_max_connections_per_ip(self):
        """The connection over --max-connections-per-ip from one address gets 503."""
        _, port = yield start_server(self, ["--max-connections-per-ip", "1"])
        yield connect_client(self, port)
        yield self.assertRefused503(port)


class KeepaliveTests(SynchronousTestCase):
    """Pings over an in-memory transport, with the time driven by hand."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        hub = immediate_hub(self.clock, node_id="t")
        self.factory = BroadcastServerFactory(
            hub, OriginPolicy(), self.clock, limits=Limits(ping_interval=25, ping_timeout=10)
        )
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.transport.clear()

    def pong(self):
        mask = b"\x00\x00\x00\x00"
        self.protocol.dataReceived(b"\x8a\x80" + mask)

    def test_ping_every_interval_while_answered(self):
        """A ping goes out every --ping-interval; an answered ping keeps the client."""
        self.clock.advance(24.9)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(0.1)
        self.assertTrue(self.transport.value().startswith(b"\x89"))
        self.transport.clear()
        self.pong()
        self.clock.advance(25)
        self.assertTrue(self.transport.value().startswith(b"\x89"))
        self.assertFalse(self.transport.disconnecting)

    def test_dead_peer_is_dropped_after_ping_timeout(self):
        """No pong within --ping-timeout: the connection is dropped and logged."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.clock.advance(25)
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(
            [e for e in logged if "[DEAD PEER]" in e.get("log_format", "")]
        )


class CompressionTests(TestCase):
    @inlineCallbacks
    def connect_deflate(self, port, json_mode=False):
        factory = WebSocketClientFactory(
            "ws://127.0.0.1:{}/".format(port),
            protocols=["broadcaster.json"] if json_mode else None,
        )
        factory.protocol = RecordingClientProtocol

        def accept(response):
            if isinstance(response, PerMessageDeflateResponse):
                return PerMessageDeflateResponseAccept(response)

        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=accept,
        )
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        self.addCleanup(close_client, client)
        yield client.opened
        return client

    @inlineCallbacks
    def test_off_by_default(self):
        """Without --compression, permessage-deflate is not negotiated."""
        _, port = yield start_server(self)
        client = yield self.connect_deflate(port)
        self.assertIsNone(client._perMessageCompress)

    @inlineCallbacks
    def test_compressed_bomb_is_refused(self):
        """With --compression, a message that inflates beyond
        --max-message-size closes its sender with 1009."""
        _, port = yield start_server(self, ["--compression"])
        client = yield self.connect_deflate(port)
        self.assertIsNotNone(client._perMessageCompress)
        yield client.next_text()
        client.sendMessage(b"a" * 10_000)
        self.assertEqual((yield client.next_text()), "a" * 10_000)
        client.sendMessage(b"a" * (65536 * 16))
        _, code, _ = yield client.closed
        self.assertEqual(code, 1009)

    @inlineCallbacks
    def test_compressed_clients_get_server_messages_of_any_size(self):
        """With --compression, a history reply and an image far larger than
        --max-message-size (even compressed) reach a compressed client."""
        service, port = yield start_server(self, ["--compression", "--rate", "0"])
        client = yield self.connect_deflate(port, json_mode=True)
        self.assertIsNotNone(client._perMessageCompress)
        welcome = yield client.next_json()
        self.assertEqual(welcome["type"], "welcome")
        # Random text compresses little: 3 x 40 kB stays over 64 KiB.
        texts = [base64.b64encode(os.urandom(30000)).decode() for _ in range(3)]
        for text in texts:
            client.send_json({"type": "message", "text": text})
        client.send_json({"type": "history"})
        while True:
            event = yield client.next_json()
            if event["type"] == "history":
                break
        self.assertEqual([m["text"] for m in event["messages"]], texts)
        camera = yield connect_raw(self, port_of(service.image_endpoint), FrameClient)
        noise = Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3))
        picture = io.BytesIO()
        noise.save(picture, format="PNG")
        camera.send_frame(picture.getvalue())
        while True:
            payload, is_binary = yield client.next()
            if is_binary:
                break
        self.assertGreater(len(payload), 65536)
        self.assertEqual(Image.open(io.BytesIO(payload)).size, (200, 200))

    @inlineCallbacks
    def test_a_compressed_client_that_stops_reading_is_cut(self):
        """A compressed client that stops reading is cut at --max-buffer
        like any other, while a reader gets everything."""
        service, port = yield start_server(
            self,
            ["--compression", "--rate", "0", "--max-buffer", "262144",
             "--max-image-size", "262144"],
        )
        (reader, _), (sender, _) = yield connect_plain_clients(self, port, 2)
        stalled = yield self.connect_deflate(port)
        yield stalled.next_text()
        yield reader.next_text()
        yield sender.next_text()
        stalled.transport.pauseProducing()
        count = 400  # 16 MB of random text
        for i in range(count):
            sender.sendMessage(b"%05d" % i + base64.b64encode(os.urandom(30000)))
            if i % 20 == 0:
                yield deferLater(reactor, 0, lambda: None)
        received = []
        while len(received) < count:
            payload, _ = yield reader.next(timeout=60)
            if not payload.endswith(b"disconnected"):
                received.append(int(payload[:5]))
        self.assertEqual(received, list(range(count)))
        yield wait_for(lambda: service.hub.stats.slow_consumers == 1, what="the cut")
        # Reading again, it finds the rest of what it had begun to receive,
        # then the server's close frame.
        stalled.transport.resumeProducing()
        _, code, _ = yield stalled.closed
        self.assertEqual(code, 4008)


class OpenFilesLimitTests(SynchronousTestCase):
    def test_soft_limit_raised_to_hard(self):
        """Start-up raises the soft open files limit to the hard one and logs it."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raise_open_files_limit(Logger())
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
        (event,) = [e for e in logged if "open files limit" in e.get("log_format", "")]
        self.assertIn(str(hard) if hard != resource.RLIM_INFINITY else "unlimited", str(event["soft"]))
