"""
Hostile clients against a real ``twistd broadcaster``: what an attacker
tries after the obvious (issue 16).  Each test replays one attack and
checks the refusal the attacker gets, the log line the operator gets, and
that an honest pair of clients chatting in the lobby meanwhile receives
every message, in order.

Where each attack is replayed:

1. raw binary shown as a picture: ``tests/test_page.py``
   (``ImagePageTests``, a real browser: the page is where it happened);
2. image formats: :class:`ImageTests`;
3. ``who`` creating rooms: :class:`RoomStateTests` (and, with a real
   ``redis-server``, ``tests/redis/test_redis.py`` ``RoomKeyTests``);
4. the decode queue and decoded memory: :class:`ImageTests`;
5. control characters in logs and terminals: :class:`TerminalAndLogTests`
   (``broadcaster-client`` in ``tests/clients/test_client.py``);
6. bad numbers: :class:`NumberTests`;
7. ``--debug`` and credentials: :class:`TerminalAndLogTests`;
8. secrets on command lines: ``tests/service/test_secrets.py``
   (``EndToEndTests``, a real ``twistd --workers 2``);
9. shutdown order: ``tests/redis/test_redis.py``
   (``test_sigterm_drains_clients_before_leaving_redis``, real twistd and
   redis-server);
10. byte budgets: :class:`HistoryFloodTests` (webhook queues:
    ``tests/http/test_webhooks.py``, a real receiver).

And one found on the way: HTTP sent to the line bridge,
:class:`CrossProtocolTests`.
"""

import io
import json

from PIL import Image
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from tests.support import (
    FrameClient,
    connect_client,
    connect_raw,
    free_port,
    start_twistd,
    wait_for,
)
from tests.http.test_metrics import scrape
from tests.test_rooms import flood, join_chat, of_type, read_until

MiB = 1024 * 1024


def costly_png(width, height):
    """A small file that takes long to decode: one colour, many pixels."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def eps():
    """An EPS file: Pillow would hand it to Ghostscript, were it tried."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto\nshowpage\n"


class HostileTestCase(TestCase):
    timeout = 120

    @inlineCallbacks
    def start(self, *args, image_port=True):
        """
        Run ``twistd broadcaster`` with ``args`` (and an image port on a
        free loopback port), and connect the honest pair, ann and bob.
        """
        extra = []
        if image_port:
            self.image_port = free_port()
            extra = ["--image-port", "tcp:{}:interface=127.0.0.1".format(self.image_port)]
        self.process, self.port = yield start_twistd(self, [*extra, *args])
        self.ann, _ = yield join_chat(self, self.port, "ann")
        self.bob, _ = yield join_chat(self, self.port, "bob")
        self.honest_sent = []
        self.honest_heard = []

    def honest_say(self, count=10):
        """Ann says ``count`` more things in the lobby."""
        for _ in range(count):
            text = "honest {}".format(len(self.honest_sent))
            self.honest_sent.append(text)
            self.ann.send_json({"type": "message", "text": text})

    @inlineCallbacks
    def bob_reads(self):
        """Bob's next JSON event (skipping binary payloads), noting what
        Ann said."""
        while True:
            payload, binary = yield self.bob.next(timeout=60)
            if binary:
                continue  # the bytes of an image or binary message
            event = json.loads(payload)
            if event["type"] == "message" and event["text"].startswith("honest "):
                self.honest_heard.append(event["text"])
            return event

    @inlineCallbacks
    def assert_honest_chat_intact(self):
        """Bob has received everything Ann said, once each, in order."""
        self.honest_say(1)
        while self.honest_sent[-1] not in self.honest_heard:
            yield self.bob_reads()
        self.assertEqual(self.honest_heard, self.honest_sent)

    def logged(self, text):
        return text in self.process.output()


class ImageTests(HostileTestCase):
    """Images the decoder must not try, and more than it can take at once."""

    @inlineCallbacks
    def test_formats_not_accepted_are_refused(self):
        """An EPS (and a PSD, a FITS, a TIFF) on the image port is answered
        'unsupported image format'; the connection stays usable for a PNG."""
        yield self.start()
        attacker = yield connect_raw(self, self.image_port, FrameClient)
        watcher = yield connect_raw(self, self.image_port, FrameClient)
        self.honest_say()
        attacker.send_frame(eps())
        reply = yield attacker.next()
        self.assertEqual(
            reply.decode(),
            "ERROR unsupported image format (the server accepts PNG, JPEG, GIF, WEBP or BMP)",
        )
        self.honest_say()
        attacker.send_frame(costly_png(3, 2))
        png = yield watcher.next()
        self.assertEqual(Image.open(io.BytesIO(png)).size, (3, 2))
        yield self.assert_honest_chat_intact()
        yield wait_for(
            lambda: self.logged("unsupported image format"), what="the refusal logged"
        )

    @inlineCallbacks
    def test_pending_decodes_are_bounded(self):
        """Four connections sending an image that takes long to decode, with
        room for one pending decode: the others are told the server is busy
        and may retry; the one accepted reaches everyone else."""
        yield self.start("--image-threads", "1", "--max-pending-images", "1")
        watcher = yield connect_raw(self, self.image_port, Frames)
        senders = []
        for _ in range(4):
            senders.append((yield connect_raw(self, self.image_port, Frames)))
        self.honest_say()
        for sender in senders:
            sender.send_frame(costly_png(4000, 3000))
        self.honest_say()
        yield wait_for(
            lambda: len(watcher.frames) + sum(len(s.errors()) for s in senders) == 4,
            timeout=60,
            what="each image decoded or refused",
        )
        errors = [error for sender in senders for error in sender.errors()]
        self.assertTrue(errors, "nobody was told the server is busy")
        self.assertEqual(
            set(errors), {"ERROR the server is busy decoding 1 other images; retry later"}
        )
        self.assertTrue(watcher.frames, "no image went through")
        yield self.assert_honest_chat_intact()
        self.assertTrue(self.logged("busy decoding 1 other images"))

    @inlineCallbacks
    def test_decoded_memory_is_bounded(self):
        """With memory to decode one large image at a time, two sent at
        once from two connections: one is refused as busy (tried until the
        two overlap), and the server goes on serving."""
        yield self.start(
            "--image-max-pixels", "6000000", "--image-decode-memory", str(6000000 * 12)
        )
        image = costly_png(3000, 2000)  # 48 MB to decode: one fits, not two
        watcher = yield connect_raw(self, self.image_port, Frames)
        senders = []
        for _ in range(2):
            senders.append((yield connect_raw(self, self.image_port, Frames)))
        errors = []
        for attempt in range(10):
            self.honest_say(3)
            seen = len(watcher.frames) + sum(len(s.errors()) for s in senders)
            for sender in senders:
                sender.send_frame(image)
            yield wait_for(
                lambda: len(watcher.frames) + sum(len(s.errors()) for s in senders) == seen + 2,
                timeout=60,
                what="both images decoded or refused",
            )
            errors = [error for sender in senders for error in sender.errors()]
            if errors:
                break
        self.assertEqual(errors, ["ERROR the server is busy decoding other images; retry later"])
        yield self.assert_honest_chat_intact()


class HistoryFloodTests(HostileTestCase):
    """A client filling the server's memory with history."""

    @inlineCallbacks
    def test_big_messages_into_many_rooms(self):
        """
        With 1 MiB of --history-memory, a client sends 12 MB of history
        into 20 rooms: its rooms lose their oldest messages (logged once),
        and a client recovering in one of them is told complete false with
        the latest of them; the lobby, quiet meanwhile, keeps all of its
        history, so an honest client recovering there gets everything;
        the honest chat goes on.
        """
        yield self.start("--history-memory", str(MiB), image_port=False)
        carol, welcome = yield join_chat(self, self.port, "carol")
        self.honest_say(3)
        yield read_until(carol, of_type("message", text=self.honest_sent[-1]))
        carol.transport.abortConnection()
        yield carol.closed

        eve, _ = yield join_chat(self, self.port, "eve")
        rooms = ["flood{}".format(i) for i in range(20)]
        sent, acks = yield flood(eve, rooms, 10, 60000)
        self.honest_say(3)
        yield self.assert_honest_chat_intact()

        again, _ = yield join_chat(self, self.port, "carol", since=(welcome["epoch"], welcome["seq"]))
        events = yield read_until(again, of_type("recovered"))
        self.assertEqual([e["text"] for e in events if e["type"] == "message"], self.honest_sent)
        self.assertTrue(events[-1]["complete"])

        watcher, _ = yield join_chat(self, self.port, "wendy")
        first = acks["flood0/0"]
        watcher.send_json(
            {"type": "join", "room": "flood0", "since": {"epoch": first["epoch"], "seq": first["seq"]}}
        )
        events = yield read_until(watcher, of_type("recovered", room="flood0"))
        self.assertFalse(events[-1]["complete"])
        replayed = [e["text"] for e in events if e["type"] == "message"]
        self.assertEqual(replayed, sent["flood0"][len(sent["flood0"]) - len(replayed):])

        samples = yield scrape(self.port)
        self.assertLessEqual(samples[("broadcaster_history_bytes", ())], MiB)
        self.assertGreater(samples[("broadcaster_history_evicted_messages_total", ())], 150)
        self.assertEqual(self.process.output().count("[HISTORY] over --history-memory"), 1)


class Frames(FrameClient):
    """An image-port client that keeps every frame it receives."""

    def __init__(self):
        super().__init__()
        self.frames = []

    def dataReceived(self, data):
        self._buffer += data
        while len(self._buffer) >= 4:
            length = int.from_bytes(self._buffer[:4], "big")
            if len(self._buffer) < 4 + length:
                return
            self.frames.append(self._buffer[4 : 4 + length])
            self._buffer = self._buffer[4 + length :]

    def errors(self):
        return [f.decode() for f in self.frames if f.startswith(b"ERROR ")]


class TerminalAndLogTests(HostileTestCase):
    """What strangers write reaches no terminal and no log raw, and no
    credential reaches the log, --debug included."""

    @inlineCallbacks
    def test_control_characters_reach_neither_log_nor_nc(self):
        """An image_url whose host carries ESC and backspace, and a message
        carrying a terminal escape sequence: the log and the line bridge's
        nc user see escapes, never the raw characters."""
        line_port = free_port()
        yield self.start(
            "--line-port", "tcp:{}:interface=127.0.0.1".format(line_port), image_port=False
        )
        nc = yield connect_raw(self, line_port, LineClient)
        self.honest_say()
        self.ann.send_json(
            {"type": "image_url", "url": "http://evil\x1bc\x08\x08.example/a.png", "ref": 1}
        )
        self.ann.send_json({"type": "message", "text": "\x1b]0;pwned\x07hello"})
        self.honest_say()
        yield self.assert_honest_chat_intact()
        yield wait_for(lambda: "hello" in nc.received(), what="the message over the bridge")
        self.assertIn("\\x1b]0;pwned\\x07hello", nc.received())
        yield wait_for(lambda: self.logged("evil\\x1bc\\x08\\x08"), what="the refusal logged")
        self.assertNotRegex(self.process.output(), "[\x00-\x08\x0b-\x1f\x7f]")

    @inlineCallbacks
    def test_debug_logs_no_credentials(self):
        """With --debug, a handshake carrying a bearer token, a cookie and
        ?token= is logged (Autobahn's chatter included) without any of them."""
        yield self.start("--debug", image_port=False)
        secrets = ["s3cr3t-bearer-%d" % i for i in range(3)]
        spy = yield connect_client(
            self,
            self.port,
            json_mode=True,
            path="/?name=eve&token=" + secrets[2],
            headers={"Authorization": "Bearer " + secrets[0], "Cookie": "session=" + secrets[1]},
        )
        self.assertEqual((yield spy.next_json())["type"], "welcome")
        spy.send_json({"type": "message", "text": "hi"})
        self.honest_say()
        yield self.assert_honest_chat_intact()
        yield wait_for(lambda: self.logged("eve"), what="the connection logged")
        output = self.process.output()
        self.assertIn("<redacted>", output)
        for secret in secrets:
            self.assertNotIn(secret, output)


class RoomStateTests(HostileTestCase):
    """Asking about rooms must not make the server keep them."""

    @inlineCallbacks
    def test_who_for_strangers_rooms_evicts_nothing(self):
        """With --max-rooms 50, 60 who requests for random rooms are each
        refused (not in the room), and a real room's history survives: a
        member coming back recovers it completely."""
        yield self.start("--max-rooms", "50", image_port=False)
        self.ann.send_json({"type": "join", "room": "real"})
        self.ann.send_json({"type": "message", "room": "real", "text": "remember me"})
        event = None
        while not (event and event["type"] == "message" and event.get("room") == "real"):
            event = yield self.ann.next_json()
        since = {"epoch": event["epoch"], "seq": event["seq"] - 1}
        self.ann.send_json({"type": "leave", "room": "real"})
        eve, _ = yield join_chat(self, self.port, "eve")
        for i in range(60):
            eve.send_json({"type": "who", "room": "probe-{}".format(i), "ref": i})
        self.honest_say()
        refused = 0
        while refused < 60:
            event = yield eve.next_json()
            if event["type"] == "error":
                self.assertEqual(event["reason"], "not in room 'probe-{}': join it first".format(event["ref"]))
                refused += 1
        self.bob.send_json({"type": "join", "room": "real", "since": since})
        while True:
            event = yield self.bob_reads()
            if event["type"] == "recovered" and event.get("room") == "real":
                break
            if event["type"] == "message" and event.get("room") == "real":
                self.assertEqual(event["text"], "remember me")
        self.assertTrue(event["complete"])
        yield self.assert_honest_chat_intact()


class CrossProtocolTests(HostileTestCase):
    """A browser made by some web page to talk HTTP to a raw port."""

    @inlineCallbacks
    def test_http_to_the_line_bridge_posts_nothing(self):
        """A form posted to the line bridge (as a page can make a browser
        do) is answered with one ERROR line and closed: its request line,
        headers and body are not posted as chat messages."""
        line_port = free_port()
        yield self.start(
            "--line-port", "tcp:{}:interface=127.0.0.1".format(line_port), image_port=False
        )
        nc = yield connect_raw(self, line_port, LineClient)
        page = yield connect_raw(self, line_port, LineClient)
        self.honest_say()
        page.transport.write(
            b"POST / HTTP/1.1\r\nHost: localhost:9997\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 14\r\n\r\nspam everyone\n"
        )
        yield page.closed
        self.assertTrue(
            page.received().endswith(
                "\nERROR this is the line bridge, not an HTTP server; closing\n"
            ),
            page.received(),
        )
        self.honest_say()
        yield self.assert_honest_chat_intact()
        nc.transport.write(b"GET / HTTP/1.1 is how it starts, I read\n")
        yield wait_for(lambda: "I read" in nc.received(), what="nc's own line back")
        self.assertNotIn("spam", nc.received())
        self.assertNotIn("Content-Type", nc.received())


class NumberTests(HostileTestCase):
    """Numbers that are not ASCII digits, or too many of them."""

    @inlineCallbacks
    def handshake_status(self, query):
        """The status line a WebSocket handshake for ``/?<query>`` gets."""
        client = yield connect_raw(self, self.port, LineClient)
        client.transport.write(
            "GET /?{} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".format(query).encode("ascii")
        )
        yield wait_for(lambda: b"\r\n" in client.data, what="a status line")
        return client.data.split(b"\r\n", 1)[0].decode("latin-1")

    @inlineCallbacks
    def test_bad_since_is_400_not_500(self):
        """?since= with a superscript digit, 5,000 digits, or a number past
        2**53 is refused with 400 and logged; a good one is accepted."""
        yield self.start(image_port=False)
        for query in ("since=abc:%C2%B2", "since=e:" + "9" * 5000, "since=e:9007199254740993"):
            self.honest_say()
            self.assertEqual(
                (yield self.handshake_status(query)),
                "HTTP/1.1 400 ?since= must be <epoch>:<seq> from the last lobby message seen",
            )
        self.assertEqual(
            (yield self.handshake_status("since=e:12")), "HTTP/1.1 101 Switching Protocols"
        )
        yield self.assert_honest_chat_intact()
        self.assertIn("bad ?since=", self.process.output())
        self.assertNotIn("Internal server error", self.process.output())

    @inlineCallbacks
    def test_bad_numbers_in_json_are_errors_with_the_ref(self):
        """A join whose since.seq is past 2**53, and a message whose ref
        has 5,000 digits: each sender is told, the connection stays up."""
        yield self.start(image_port=False)
        self.ann.send_json({"type": "join", "room": "r", "since": {"epoch": "e", "seq": 10**30}, "ref": "j"})
        self.ann.sendMessage(b'{"type":"message","text":"x","ref":' + b"9" * 5000 + b"}")
        self.honest_say()
        errors = []
        while len(errors) < 2:
            event = yield self.ann.next_json()
            if event["type"] == "error":
                errors.append(event)
        self.assertEqual(errors[0]["ref"], "j")
        self.assertIn('"since" must be', errors[0]["reason"])
        self.assertIn("malformed JSON", errors[1]["reason"])
        yield self.assert_honest_chat_intact()


class LineClient(Protocol):
    """A line-bridge client that keeps what it receives."""

    def connectionMade(self):
        self.data = b""
        self.closed = Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(None)

    def received(self):
        return self.data.decode("utf-8")
