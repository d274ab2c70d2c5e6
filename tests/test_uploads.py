"""
Images uploaded by JSON clients (an ``image`` request, then the bytes as
one binary message), through a real server to real clients of every kind
that gets images, and the ways an upload can go wrong.
"""

import io
import json
import os

from PIL import Image
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from broadcaster.core.permissions import parse_grants
from tests.support import FrameClient, connect_raw, port_of, start_server, wait_for
from tests.test_rooms import join_chat, of_type, read_until


def noisy_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: larger than --max-message-size."""
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class UploadTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(
            self, ["--max-image-size", "1000000", "--image-max-pixels", "1000000"]
        )
        self.image_port = port_of(self.service.image_endpoint)

    @inlineCallbacks
    def upload(self, client, data, ref="up", room=None, size=None):
        request = {"type": "image", "size": len(data) if size is None else size, "ref": ref}
        if room is not None:
            request["room"] = room
        client.send_json(request)
        client.sendMessage(data, isBinary=True)
        while True:
            # Its own image may come first (the event, then the PNG).
            payload, binary = yield client.next()
            if not binary:
                event = json.loads(payload)
                if event.get("ref") == ref and event["type"] in ("ack", "error"):
                    return event

    @inlineCallbacks
    def next_image(self, client):
        """The next image event a JSON client gets, and its PNG."""
        header = (yield read_until(client, of_type("image")))[-1]
        payload, binary = yield client.next()
        self.assertTrue(binary)
        return header, payload

    @inlineCallbacks
    def test_the_welcome_tells_the_limit(self):
        """The welcome's limits carry --max-image-size, so that a client can
        refuse a larger image before sending a byte of it."""
        _, welcome = yield join_chat(self, self.port, "ann")
        self.assertEqual(welcome["limits"]["max_image_size"], 1000000)

    @inlineCallbacks
    def test_an_upload_reaches_browsers_and_the_image_port(self):
        """An image larger than --max-message-size, announced and sent,
        reaches another JSON client (the image event, then the PNG) and an
        image-port client, normalised; the sender gets its ack."""
        camera = yield connect_raw(self, self.image_port, FrameClient)
        viewer, _ = yield join_chat(self, self.port, "viewer")
        ann, _ = yield join_chat(self, self.port, "ann")
        yield wait_for(lambda: len(self.service.hub) == 3, what="three members")
        data = noisy_png(200, 150)
        self.assertGreater(len(data), 64 * 1024)
        ack = yield self.upload(ann, data)
        self.assertEqual((ack["type"], ack["room"]), ("ack", "lobby"))
        header, png = yield self.next_image(viewer)
        self.assertEqual((header["id"], header["width"], header["height"]), (ack["image"], 200, 150))
        self.assertEqual(Image.open(io.BytesIO(png)).format, "PNG")
        self.assertEqual((yield camera.next()), png)
        # The larger limit was for that one message.
        ann.sendMessage(b"\x00" * 200000, isBinary=True)
        self.assertEqual((yield ann.closed)[1], 1009)

    @inlineCallbacks
    def test_an_upload_to_a_room_stays_in_it(self):
        camera = yield connect_raw(self, self.image_port, FrameClient)
        ann, _ = yield join_chat(self, self.port, "ann")
        bob, _ = yield join_chat(self, self.port, "bob")
        for client in (ann, bob):
            client.send_json({"type": "join", "room": "dev"})
            yield read_until(client, of_type("presence", room="dev"))
        ack = yield self.upload(ann, noisy_png(20, 20), room="dev")
        self.assertEqual(ack["room"], "dev")
        header, _ = yield self.next_image(bob)
        self.assertEqual((header["room"], header["id"]), ("dev", ack["image"]))
        # The image-port client is in the lobby only: the first image it
        # gets is the next one shared there.
        lobby = yield self.upload(ann, noisy_png(30, 30), ref="lobby")
        header, png = yield self.next_image(bob)
        self.assertEqual(header["id"], lobby["image"])
        self.assertEqual((yield camera.next()), png)

    @inlineCallbacks
    def test_refusals_leave_the_connection_serving(self):
        """Too large, not an image, a size that does not match, a room not
        joined, bytes that never came: each an error with the request's
        ref; the client keeps its connection and an honest one gets
        every message meanwhile."""
        honest, _ = yield join_chat(self, self.port, "honest")
        ann, _ = yield join_chat(self, self.port, "ann")
        ann.send_json({"type": "image", "size": 2000000, "ref": "big"})
        error = (yield read_until(ann, of_type("error", ref="big")))[-1]
        self.assertIn("at most 1000000 bytes", error["reason"])
        error = yield self.upload(ann, b"\x89PNG not really", ref="junk")
        self.assertEqual(error["type"], "error")
        self.assertTrue(error["reason"].startswith("image: "), error)
        error = yield self.upload(ann, noisy_png(10, 10), ref="short", size=100000)
        self.assertIn("announced 100000 bytes", error["reason"])
        ann.send_json({"type": "image", "size": 10, "room": "elsewhere", "ref": "room"})
        error = (yield read_until(ann, of_type("error", ref="room")))[-1]
        self.assertEqual(error["reason"], "image: not in room 'elsewhere': join it first")
        ann.send_json({"type": "image", "size": 10, "ref": "missing"})
        ann.send_json({"type": "message", "text": "changed my mind", "ref": "text"})
        error = (yield read_until(ann, of_type("error", ref="missing")))[-1]
        self.assertIn("next message", error["reason"])
        yield read_until(ann, of_type("ack", ref="text"))
        texts = yield read_until(honest, of_type("message", text="changed my mind"))
        self.assertEqual([e["text"] for e in texts if e["type"] == "message"], ["changed my mind"])
        self.assertFalse(ann.closed.called)

    @inlineCallbacks
    def test_a_large_binary_message_still_needs_announcing(self):
        """Without an image request the limit is --max-message-size: a
        larger binary message is refused (1009) from its header."""
        ann, _ = yield join_chat(self, self.port, "ann")
        ann.sendMessage(b"\x00" * 200000, isBinary=True)
        closed = yield ann.closed
        self.assertEqual(closed[1], 1009)

    @inlineCallbacks
    def test_without_the_right_nothing_is_read(self):
        ann, welcome = yield join_chat(self, self.port, "ann")
        self.service.hub.regrant(
            self.service.hub.member(welcome["id"]), parse_grants({"lobby": ["join"]})
        )
        ann.send_json({"type": "image", "size": 10, "ref": "no"})
        error = (yield read_until(ann, of_type("error", ref="no")))[-1]
        self.assertEqual(error["reason"], "image: not allowed to publish in room 'lobby'")
        # The limit was not raised for it.
        ann.sendMessage(b"\x00" * 200000, isBinary=True)
        self.assertEqual((yield ann.closed)[1], 1009)


class RefusedUploadTests(TestCase):
    """What follows an image request that was refused, or announced and
    not sent, is never broadcast beyond its limits."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(
            self, ["--max-image-size", "1000000", "--max-message-size", "65536"]
        )
        self.honest, _ = yield join_chat(self, self.port, "honest")
        self.ann, _ = yield join_chat(self, self.port, "ann")

    @inlineCallbacks
    def honest_hears_only(self, text):
        """The next thing the honest member hears (a message) is ``text``."""
        self.ann.send_json({"type": "message", "text": text, "ref": "marker"})
        while True:
            payload, binary = yield self.honest.next()
            self.assertFalse(binary, "a binary message reached the lobby")
            event = json.loads(payload)
            self.assertNotEqual(event["type"], "binary", event)
            if event["type"] == "message":
                self.assertEqual(event["text"], text)
                return

    @inlineCallbacks
    def test_the_bytes_of_a_refused_image_are_discarded(self):
        """Refused for a room it is not in, or malformed: the photo that
        follows is not shared as a binary message in the lobby, and the
        sender stays connected."""
        photo = noisy_png(40, 40)
        for request in (
            {"type": "image", "size": len(photo), "room": "typo", "ref": 1},
            {"type": "image", "size": "big", "ref": 2},
        ):
            self.ann.send_json(request)
            self.ann.sendMessage(photo, isBinary=True)
            error = (yield read_until(self.ann, of_type("error", ref=request["ref"])))[-1]
            self.assertTrue(error["reason"].startswith(("image: ", '"size"')), error)
        yield self.honest_hears_only("after the photos")
        self.assertFalse(self.ann.closed.called)

    @inlineCallbacks
    def test_an_announced_image_does_not_let_a_large_text_through(self):
        """Announcing an image then sending a text larger than
        --max-message-size: the text is refused, nobody gets it."""
        self.ann.send_json({"type": "image", "size": 1000000, "ref": "img"})
        self.ann.send_json({"type": "message", "text": "B" * 500000, "ref": "huge"})
        errors = yield read_until(self.ann, lambda e: e["type"] == "error" and e.get("ref") is None)
        self.assertIn("at most 65536 bytes", errors[-1]["reason"])
        self.assertIn("img", [e.get("ref") for e in errors if e["type"] == "error"])
        yield self.honest_hears_only("after the big text")


class RateLimitedUploadTests(TestCase):
    """An image request dropped by the rate limit: its bytes are dropped
    too, never broadcast, and the connection stays."""

    @inlineCallbacks
    def test_the_bytes_of_a_rate_limited_image_are_discarded(self):
        service, port = yield start_server(
            self, ["--rate", "1000", "--burst", "2", "--max-image-size", "1000000"]
        )
        honest, _ = yield join_chat(self, port, "honest")
        ann, _ = yield join_chat(self, port, "ann")
        photo = noisy_png(30, 30)
        # Three in one read: the third, the image request, is over the burst.
        ann.send_json({"type": "message", "text": "one"})
        ann.send_json({"type": "message", "text": "two"})
        ann.send_json({"type": "image", "size": len(photo), "ref": "img"})
        error = (yield read_until(ann, of_type("error", ref="img")))[-1]
        self.assertIn("rate limit exceeded", error["reason"])
        # A round trip later the limit lets a message through again: the
        # photo, which must still not be taken for a binary message.
        ann.sendMessage(photo, isBinary=True)
        self.assertFalse(ann.closed.called)
        # Another member's message comes next: nothing of the photo reached
        # the honest member before it, no binary and no image.
        bob, _ = yield join_chat(self, port, "bob")
        bob.send_json({"type": "message", "text": "marker"})
        seen = []
        while not seen or seen[-1] != ("message", "marker"):
            payload, binary = yield honest.next()
            self.assertFalse(binary, "a binary message reached the lobby")
            event = json.loads(payload)
            seen.append((event["type"], event.get("text")))
        self.assertEqual(
            [s for s in seen if s[0] != "join"],
            [("message", "one"), ("message", "two"), ("message", "marker")],
        )
