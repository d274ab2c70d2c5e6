"""
The bounds hold on every path out of a connection, against a real ``twistd
broadcaster`` whose memory is read from ``/proc``: clients that never read
are cut at ``--max-buffer`` whatever produced their backlog (their own
requests' replies, images), shared payloads are not copied per client, an
honest client meanwhile receives everything, and room histories keep no
more than ``--history-memory``.
"""

from __future__ import annotations

import io
import json
import os

from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.support import (
    OP_TEXT,
    FrameClient,
    build_frame,
    connect_client,
    connect_raw,
    free_port,
    listening,
    start_twistd,
    wait_for,
)
from tests.test_rooms import join_chat, of_type, read_until

MiB = 1024 * 1024


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    with open("/proc/{}/status".format(pid)) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for {}".format(pid))


class NeverReader(Protocol):
    """
    A WebSocket client that completes its handshake, then never reads again
    (a frozen phone, or an attacker growing the server's memory), though
    it may still send.
    """

    #: The request path and subprotocol, set on the factory's class.
    path = "/"
    subprotocol = None
    lost = False

    def connectionMade(self) -> None:
        self.opened = False
        self._received = b""
        extra = ""
        if self.subprotocol is not None:
            extra = "Sec-WebSocket-Protocol: {}\r\n".format(self.subprotocol)
        self.transport.write(
            "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n{}\r\n".format(self.path, extra).encode("ascii")
        )

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if b"\r\n\r\n" in self._received and not self.opened:
            assert self._received.startswith(b"HTTP/1.1 101"), self._received[:200]
            self.opened = True
            self.transport.pauseProducing()

    def connectionLost(self, reason) -> None:
        self.lost = True


class JSONNeverReader(NeverReader):
    subprotocol = "broadcaster.json"


def png_of_noise(side: int) -> bytes:
    """A PNG of random pixels: it does not compress, so it is as large as its pixels."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=0)
    return out.getvalue()


@inlineCallbacks
def never_readers(testcase, port, protocol_class, count):
    """Connect ``count`` clients that stop reading once they are in."""
    clients = []
    for _ in range(count):
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(protocol_class)
        )
        testcase.addCleanup(client.transport.abortConnection)
        clients.append(client)
    yield wait_for(lambda: all(c.opened for c in clients), what="the handshakes")
    return clients


class RepliesAreBudgetedTests(TestCase):
    """
    Replies to a client's own requests go through the same budget as the
    fan-out.
    """

    @inlineCallbacks
    def test_history_requests_from_a_client_that_never_reads(self):
        """
        A client that never reads and keeps asking for the history is cut
        as a slow consumer at --max-buffer; the server grows by little more
        than that, and an honest client gets every message meanwhile.
        """
        process, port = yield start_twistd(
            self,
            ["--max-buffer", str(4 * MiB), "--max-image-size", str(4 * MiB), "--rate", "0"],
        )
        honest, _ = yield join_chat(self, port, "honest")
        # Fill the lobby's history: each reply to "history" is then 256 KiB.
        for i in range(100):
            honest.send_json({"type": "message", "text": "{:03d}".format(i) + "h" * 60000})
        events = yield read_until(honest, of_type("message", seq=100) , limit=200)
        self.assertEqual(len([e for e in events if e["type"] == "message"]), 100)
        (attacker,) = yield never_readers(self, port, JSONNeverReader, 1)
        yield wait_for(lambda: "2 connected" in process.output(), what="the attacker to be in")
        before = rss(process.transport.pid)

        # 400 replies of 256 KiB: 100 MiB, were they all kept.
        request = build_frame(OP_TEXT, json.dumps({"type": "history"}).encode())
        attacker.transport.write(request * 400)
        for i in range(20):
            honest.send_json({"type": "message", "text": "during {}".format(i)})
        texts = []
        while len(texts) < 20:
            event = yield honest.next_json()
            if event["type"] == "message":
                texts.append(event["text"])
        self.assertEqual(texts, ["during {}".format(i) for i in range(20)])
        yield wait_for(
            lambda: "[SLOW CONSUMER]" in process.output(), timeout=20,
            what="the attacker to be cut",
        )
        grown = rss(process.transport.pid) - before
        self.assertLess(grown, 4 * MiB + 12 * MiB, "the server grew by {} bytes".format(grown))
        # The attacker reads nothing, so it is the server that must let go.
        cut = process.output().split("[SLOW CONSUMER] ")[1].split()[0]
        yield wait_for(
            lambda: "[DISCONNECT] {} disconnected".format(cut) in process.output(), timeout=20,
            what="the server to drop the attacker's connection",
        )


class SharedPayloadTests(TestCase):
    """
    A payload sent to many clients is held once, whoever is slow.
    """

    @inlineCallbacks
    def test_an_image_to_forty_clients_that_never_read(self):
        """
        Forty clients that never read and one near-maximum image cost the
        server a few copies of the image, not one per client; the next
        image cuts them as slow consumers, and a client that reads gets
        both images.
        """
        image_port = free_port()
        process, port = yield start_twistd(
            self, ["--image-port", "tcp:{}:interface=127.0.0.1".format(image_port)]
        )
        yield wait_for(lambda: listening(image_port), what="the image port")
        reader = yield connect_client(self, port)
        yield reader.next_text()  # its own arrival
        yield never_readers(self, port, NeverReader, 40)
        camera = yield connect_raw(self, image_port, FrameClient)
        png = png_of_noise(2250)  # 15.2 MB
        self.assertGreater(len(png), 14 * MiB)
        before = rss(process.transport.pid)

        camera.send_frame(png)
        first = yield _next_binary(reader)
        grown = rss(process.transport.pid) - before
        # The source, its decoded pixels, the PNG and its frames: a handful
        # of copies, where one per client would be forty.
        self.assertLess(grown, 8 * len(png), "the server grew by {} bytes".format(grown))
        camera.send_frame(png)
        second = yield _next_binary(reader)
        self.assertEqual(len(first), len(second))
        yield wait_for(
            lambda: process.output().count("[SLOW CONSUMER]") == 40, timeout=30,
            what="the forty non-readers to be cut",
        )


@inlineCallbacks
def _next_binary(client):
    while True:
        payload, is_binary = yield client.next(timeout=60)
        if is_binary:
            return payload


class Lurker(Protocol):
    """
    A plain WebSocket client with a 32-character name that reads (and
    ignores) everything: a member of a big lobby.
    """

    number = 0

    def connectionMade(self) -> None:
        Lurker.number += 1
        self.opened = False
        name = "lurker-{:05d}-".format(Lurker.number).ljust(32, "x")
        self.transport.write(
            "GET /?name={} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".format(name).encode("ascii")
        )

    def dataReceived(self, data: bytes) -> None:
        if not self.opened:
            assert data.startswith(b"HTTP/1.1 101"), data[:200]
            self.opened = True


@inlineCallbacks
def fill_lobby(testcase, port: int, count: int, batch: int = 100):
    """Connect ``count`` lurkers, ``batch`` at a time."""
    from twisted.internet.defer import gatherResults

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    clients = []
    for start in range(0, count, batch):
        connected = yield gatherResults(
            [endpoint.connect(Factory.forProtocol(Lurker)) for _ in range(min(batch, count - start))]
        )
        for client in connected:
            testcase.addCleanup(client.transport.abortConnection)
        clients.extend(connected)
        yield wait_for(lambda: all(c.opened for c in connected), what="a batch of handshakes")
    return clients


class BigRoomTests(TestCase):
    """
    A room of thousands is joinable, listable and readable: nothing the
    server sends grows with it.
    """

    @inlineCallbacks
    def test_a_lobby_of_two_thousand(self):
        """
        With 2,000 members with 32-character names in the lobby, a new JSON
        client gets its welcome (the count and one page of members) first,
        ``who`` pages through every member exactly once, and ``history``
        works when the kept messages total over 64 KiB.
        """
        process, port = yield start_twistd(self, ["--history-size", "100"])
        yield fill_lobby(self, port, 2000)
        yield wait_for(
            lambda: "; 2000 connected" in process.output(), timeout=30, what="2,000 members"
        )
        ann, welcome = yield join_chat(self, port, "ann")
        self.assertEqual(welcome["count"], 2001)
        self.assertEqual(len(welcome["members"]), 100)
        self.assertIsNotNone(welcome["next"])

        listed = [m["id"] for m in welcome["members"]]
        cursor = welcome["next"]
        while cursor is not None:
            ann.send_json({"type": "who", "cursor": cursor})
            page = (yield read_until(ann, of_type("presence", cursor=cursor)))[-1]
            self.assertLessEqual(len(page["members"]), 100)
            self.assertEqual(page["count"], 2001)
            listed.extend(m["id"] for m in page["members"])
            cursor = page["next"]
        self.assertEqual(len(listed), 2001)
        self.assertEqual(len(set(listed)), 2001)
        self.assertIn(welcome["id"], listed)

        texts = ["{}".format(i) * 30000 for i in range(5)]
        for text in texts:
            ann.send_json({"type": "message", "text": text})
        ann.send_json({"type": "history"})
        history = (yield read_until(ann, of_type("history")))[-1]
        self.assertEqual([m["text"] for m in history["messages"]], texts)
        self.assertIs(history["more"], False)

        # 600 KB more: a reply holds 256 KiB at most, and pages back.
        texts += ["{}".format(i % 10) * 60000 for i in range(5, 15)]
        for text in texts[5:]:
            ann.send_json({"type": "message", "text": text})
        request = {"type": "history"}
        pages = []
        while True:
            ann.send_json(request)
            page = (yield read_until(ann, of_type("history")))[-1]
            self.assertLessEqual(len(json.dumps(page)), 256 * 1024 + 200)
            pages.insert(0, page["messages"])
            if not page["more"]:
                break
            request = {"type": "history", "before": page["messages"][0]["seq"]}
        self.assertGreater(len(pages), 2)
        self.assertEqual([m["text"] for page in pages for m in page], texts)
        self.assertNotIn("PayloadExceededError", process.output())


class HistoryMemoryTests(TestCase):
    """
    What room histories keep is bounded in bytes, whatever clients send.
    """

    timeout = 120

    @inlineCallbacks
    def test_a_flood_of_big_messages_into_many_rooms(self):
        """
        A client sends 60 MB of messages into 40 rooms of a server with
        4 MiB of --history-memory: the server grows by little more than
        that, where it would otherwise keep all 60 MB (--history-size 100
        and --max-rooms allow it; a budget of 1 GiB grows it by 59 MiB).
        """
        process, port = yield start_twistd(self, ["--history-memory", str(4 * MiB), "--rate", "0"])
        eve, _ = yield join_chat(self, port, "eve")
        rooms = ["flood{}".format(i) for i in range(40)]
        for room in rooms:
            eve.send_json({"type": "join", "room": room})
            yield read_until(eve, of_type("presence", room=room))
        before = rss(process.transport.pid)
        for n in range(25):
            for room in rooms:
                eve.send_json({"type": "message", "room": room, "ref": n,
                               "text": "{} {} ".format(room, n).ljust(60000, "x")})
            # One round at a time: the server reads no faster than eve does.
            yield read_until(eve, of_type("ack", room=rooms[-1], ref=n), limit=1000)
        grown = rss(process.transport.pid) - before
        self.assertLess(grown, 4 * MiB + 12 * MiB, "the server grew by {} bytes".format(grown))
