"""
Tests for :mod:`broadcaster.wire`: how events are encoded for each kind of
client, and how JSON-mode input is checked.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from broadcaster.hub import BinaryMessage, Joined, Left, TextMessage
from broadcaster.wire import BadRequest, JSONCodec, PlainCodec, parse_client_message


class PlainCodecTests(SynchronousTestCase):
    codec = PlainCodec()

    def test_announcements_are_sentences(self) -> None:
        """Joins and leaves read '<id> connected' / '<id> disconnected'."""
        self.assertEqual(self.codec.encode(Joined(1, "n-1")), [(b"n-1 connected", False)])
        self.assertEqual(self.codec.encode(Left(1, "n-1")), [(b"n-1 disconnected", False)])

    def test_text_is_unchanged(self) -> None:
        """A text message is passed on exactly, as UTF-8."""
        self.assertEqual(
            self.codec.encode(TextMessage(1, "n-1", '{"not": "parsed"} \u00e9')),
            [('{"not": "parsed"} \u00e9'.encode("utf-8"), False)],
        )

    def test_binary_is_unchanged(self) -> None:
        """A binary message stays binary, byte for byte."""
        self.assertEqual(
            self.codec.encode(BinaryMessage(1, "n-1", b"\x00\x01")), [(b"\x00\x01", True)]
        )


class JSONCodecTests(SynchronousTestCase):
    codec = JSONCodec()

    def decode(self, frames):
        return [json.loads(payload) if not binary else payload for payload, binary in frames]

    def test_message_event(self) -> None:
        """A message carries type, sender, text and time."""
        self.assertEqual(
            self.decode(self.codec.encode(TextMessage(12.34567, "n-1", "hi \u2603"))),
            [{"type": "message", "from": "n-1", "text": "hi \u2603", "ts": 12.346}],
        )

    def test_join_and_leave_events(self) -> None:
        """Joins and leaves name the member."""
        self.assertEqual(
            self.decode(self.codec.encode(Joined(1, "n-2"))),
            [{"type": "join", "id": "n-2", "ts": 1}],
        )
        self.assertEqual(
            self.decode(self.codec.encode(Left(2, "n-2"))),
            [{"type": "leave", "id": "n-2", "ts": 2}],
        )

    def test_binary_is_a_header_then_the_bytes(self) -> None:
        """A binary message is announced by a header naming its size, then sent as is."""
        self.assertEqual(
            self.decode(self.codec.encode(BinaryMessage(1, "n-3", b"abc"))),
            [{"type": "binary", "from": "n-3", "size": 3, "ts": 1}, b"abc"],
        )

    def test_welcome_and_error(self) -> None:
        """The welcome names the client and those present; errors give a reason."""
        self.assertEqual(
            json.loads(self.codec.welcome("n-2", ["n-1", "n-2"])),
            {"type": "welcome", "id": "n-2", "members": [{"id": "n-1"}, {"id": "n-2"}]},
        )
        self.assertEqual(
            json.loads(self.codec.error("nope")), {"type": "error", "reason": "nope"}
        )


class ParseClientMessageTests(SynchronousTestCase):
    def assertRefused(self, payload: bytes, *fragments: str) -> None:
        reason = str(self.assertRaises(BadRequest, parse_client_message, payload))
        for fragment in fragments:
            self.assertIn(fragment, reason)

    def test_message(self) -> None:
        """A well-formed message is accepted with its text."""
        self.assertEqual(
            parse_client_message(b'{"type": "message", "text": "hi"}'),
            {"type": "message", "text": "hi"},
        )

    def test_malformed_json(self) -> None:
        """Text that is not JSON is refused as malformed."""
        self.assertRefused(b"hello", "malformed JSON")

    def test_not_an_object(self) -> None:
        """JSON that is not an object is refused, naming what it was."""
        self.assertRefused(b"[1, 2]", "JSON object", "list")

    def test_missing_type(self) -> None:
        """An object without a type is refused, listing the known types."""
        self.assertRefused(b'{"text": "x"}', '"type"', "message")

    def test_unknown_type(self) -> None:
        """An unknown type is refused, naming it."""
        self.assertRefused(b'{"type": "shout"}', "'shout'")

    def test_message_without_text(self) -> None:
        """A message needs a text string."""
        self.assertRefused(b'{"type": "message"}', '"text"')
        self.assertRefused(b'{"type": "message", "text": 5}', '"text"')
