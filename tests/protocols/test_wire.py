"""
Tests for :mod:`broadcaster.protocols.wire`: how events are encoded for each kind of
client, and how JSON-mode input is checked.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.events import BinaryMessage, ImageMessage, Joined, Left, Renamed, TextMessage
from broadcaster.protocols.wire import (
    parse_since_param,
    MEMBERS_PAGE,
    BadRequest,
    JSONCodec,
    PlainCodec,
    members_page,
    parse_client_message,
)


class Someone:
    user = None

    def __init__(self, member_id, name=None):
        self.id = member_id
        self.name = name


class PlainCodecTests(SynchronousTestCase):
    codec = PlainCodec()

    def test_lobby_announcements_are_sentences(self) -> None:
        """Lobby joins and leaves read '<id> connected' / '<id> disconnected'."""
        self.assertEqual(
            self.codec.encode(Joined(1, "lobby", "n-1")), [(b"n-1 connected", False)]
        )
        self.assertEqual(
            self.codec.encode(Left(1, "lobby", "n-1")), [(b"n-1 disconnected", False)]
        )

    def test_other_rooms_and_renames_are_not_shown(self) -> None:
        """Plain clients live in the lobby: other rooms' comings and goings are not theirs."""
        self.assertEqual(self.codec.encode(Joined(1, "dev", "n-1")), [])
        self.assertEqual(self.codec.encode(Renamed(1, "lobby", "n-1", "Ann")), [])

    def test_text_is_unchanged(self) -> None:
        """A text message is passed on exactly, as UTF-8."""
        self.assertEqual(
            self.codec.encode(TextMessage(1, "lobby", "n-1", '{"not": "parsed"} \u00e9')),
            [('{"not": "parsed"} \u00e9'.encode("utf-8"), False)],
        )

    def test_binary_and_images_are_binary(self) -> None:
        """A binary message stays binary, byte for byte; an image is its PNG."""
        self.assertEqual(
            self.codec.encode(BinaryMessage(1, "n-1", b"\x00\x01")), [(b"\x00\x01", True)]
        )
        self.assertEqual(
            self.codec.encode(ImageMessage(1, "n-1", "i1", b"PNG", 1, 1)), [(b"PNG", True)]
        )


class JSONCodecTests(SynchronousTestCase):
    codec = JSONCodec()

    def decode(self, frames):
        return [json.loads(payload) if not binary else payload for payload, binary in frames]

    def test_message_event(self) -> None:
        """A message carries room, sender, name, text, time, seq and epoch."""
        event = TextMessage(12.34567, "dev", "n-1", "hi \u2603", "Ann", 7, "e1")
        self.assertEqual(
            self.decode(self.codec.encode(event)),
            [
                {
                    "type": "message",
                    "room": "dev",
                    "from": "n-1",
                    "name": "Ann",
                    "text": "hi \u2603",
                    "ts": 12.346,
                    "seq": 7,
                    "epoch": "e1",
                }
            ],
        )

    def test_join_leave_and_rename_events(self) -> None:
        """Joins, leaves and renames name the room and the member."""
        for event, kind in [
            (Joined(1, "dev", "n-2", "Bo"), "join"),
            (Left(2, "dev", "n-2", "Bo"), "leave"),
            (Renamed(3, "dev", "n-2", "Bo"), "rename"),
        ]:
            self.assertEqual(
                self.decode(self.codec.encode(event)),
                [{"type": kind, "room": "dev", "id": "n-2", "name": "Bo", "ts": event.ts}],
            )

    def test_binary_is_a_header_then_the_bytes(self) -> None:
        """A binary message is announced by a header naming its size, then sent as is."""
        self.assertEqual(
            self.decode(self.codec.encode(BinaryMessage(1, "n-3", b"abc"))),
            [{"type": "binary", "room": "lobby", "from": "n-3", "size": 3, "ts": 1}, b"abc"],
        )

    def test_image_is_metadata_then_the_png(self) -> None:
        """An image is announced with its id, size and dimensions, then its PNG."""
        header, png = self.decode(self.codec.encode(ImageMessage(1, "n-3", "i9", b"PNG!", 4, 5)))
        self.assertEqual(
            header,
            {
                "type": "image", "room": "lobby", "id": "i9", "from": "n-3", "width": 4,
                "height": 5, "format": "png", "size": 4, "ts": 1,
            },
        )
        self.assertEqual(png, b"PNG!")

    def test_welcome(self) -> None:
        """The welcome names the client, who is in the lobby, the lobby's
        sequence position and the limits."""
        me = Someone("n-2", "Bo")
        welcome = json.loads(
            self.codec.welcome(me, [Someone("n-1"), me], "e1", 4, {"max_message_size": 9})
        )
        self.assertEqual(
            welcome,
            {
                "type": "welcome", "id": "n-2", "name": "Bo", "room": "lobby",
                "members": [{"id": "n-1", "name": None}, {"id": "n-2", "name": "Bo"}],
                "count": 2, "next": None,
                "epoch": "e1", "seq": 4, "limits": {"max_message_size": 9},
            },
        )

    def test_welcome_of_a_big_lobby_lists_one_page(self) -> None:
        """In a lobby of 20,000 members with the longest names, the welcome
        carries the count and the first page of members, and stays small."""
        name = "\u00e9" * 32
        me = Someone("n-20000", name)
        lobby = [Someone("n-{}".format(i), name) for i in range(19999)] + [me]
        welcome = json.loads(self.codec.welcome(me, lobby, "e1", 4, {}))
        self.assertEqual(welcome["count"], 20000)
        self.assertEqual(len(welcome["members"]), MEMBERS_PAGE)
        self.assertEqual(welcome["next"], welcome["members"][-1]["id"])
        self.assertLess(len(self.codec.welcome(me, lobby, "e1", 4, {})), 16 * 1024)

    def test_replies(self) -> None:
        """Acks, presence, history, recovered and errors have their documented shapes."""
        message = TextMessage(1, "dev", "n-1", "x", None, 3, "e1")
        self.assertEqual(
            json.loads(self.codec.ack("r1", message)),
            {"type": "ack", "ref": "r1", "room": "dev", "seq": 3, "epoch": "e1"},
        )
        self.assertEqual(
            json.loads(self.codec.presence("dev", [Someone("n-1", "A")], "e1", 3)),
            {"type": "presence", "room": "dev", "members": [{"id": "n-1", "name": "A"}],
             "count": 1, "next": None, "cursor": None, "epoch": "e1", "seq": 3},
        )
        history = json.loads(self.codec.history("dev", [message], False))
        self.assertEqual(history["messages"][0]["seq"], 3)
        self.assertIs(history["more"], False)
        self.assertEqual(
            json.loads(self.codec.recovered("dev", False)),
            {"type": "recovered", "room": "dev", "complete": False},
        )
        self.assertEqual(json.loads(self.codec.error("nope")), {"type": "error", "reason": "nope"})
        self.assertEqual(json.loads(self.codec.error("nope", 5))["ref"], 5)


class PagingTests(SynchronousTestCase):
    def test_pages_list_every_member_once_whoever_comes_and_goes(self) -> None:
        """Following ``next`` lists each member who stays exactly once, in
        id order, while others leave and join between pages."""
        room = [Someone("n-{}".format(i)) for i in range(250)]
        stayers = {m.id for m in room if int(m.id[2:]) % 3}
        seen = []
        cursor = None
        pages = 0
        while True:
            page, cursor = members_page(room, cursor, 40)
            seen.extend(m.id for m in page)
            pages += 1
            # Between pages: a third of the room leaves, newcomers arrive.
            room = [m for m in room if m.id in stayers] + [Someone("z-{}".format(pages))]
            if cursor is None:
                break
        self.assertEqual(seen, sorted(seen))
        self.assertEqual(len(seen), len(set(seen)))
        self.assertLessEqual(stayers, set(seen))

    def test_history_reply_is_bounded_and_says_there_is_more(self) -> None:
        """A history reply holds the newest messages that fit in its size
        bound, says ``more``, and always holds at least one message."""
        messages = [
            TextMessage(1, "dev", "n-1", "x" * 60000, None, seq, "e1") for seq in range(1, 101)
        ]
        reply = JSONCodec().history("dev", messages, False, max_size=256 * 1024)
        self.assertLessEqual(len(reply), 256 * 1024 + 200)
        history = json.loads(reply)
        self.assertIs(history["more"], True)
        self.assertEqual([m["seq"] for m in history["messages"]], [97, 98, 99, 100])
        one = json.loads(JSONCodec().history("dev", messages, False, max_size=10))
        self.assertEqual([m["seq"] for m in one["messages"]], [100])


class ParseClientMessageTests(SynchronousTestCase):
    def parse(self, obj, **kwargs):
        return parse_client_message(json.dumps(obj).encode(), **kwargs)

    def assertRefused(self, payload, *fragments, ref=None):
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        error = self.assertRaises(BadRequest, parse_client_message, payload)
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        self.assertEqual(error.ref, ref)

    def test_message(self) -> None:
        """A message has text, a room (the lobby by default) and an optional ref."""
        self.assertEqual(
            self.parse({"type": "message", "text": "hi"}),
            {"type": "message", "text": "hi", "room": "lobby", "ref": None},
        )
        self.assertEqual(
            self.parse({"type": "message", "text": "hi", "room": "dev", "ref": 4}),
            {"type": "message", "text": "hi", "room": "dev", "ref": 4},
        )

    def test_join_with_and_without_since(self) -> None:
        """A join names a room and may ask to recover from an epoch and seq."""
        self.assertEqual(self.parse({"type": "join", "room": "dev"})["since"], None)
        self.assertEqual(
            self.parse({"type": "join", "room": "dev", "since": {"epoch": "e", "seq": 3}})["since"],
            ("e", 3),
        )

    def test_hello_trims_and_checks_the_name(self) -> None:
        """A name is trimmed; empty, overlong and control-character names are refused."""
        self.assertEqual(self.parse({"type": "hello", "name": "  Ann "})["name"], "Ann")
        self.assertRefused({"type": "hello", "name": "   "}, "empty")
        self.assertRefused({"type": "hello", "name": "x" * 33}, "at most 32")
        self.assertRefused({"type": "hello", "name": "a\nb"}, "control")
        self.assertRefused({"type": "hello", "name": "a\u202eb"}, "control")

    def test_history_limit_is_capped(self) -> None:
        """A history limit above the history size is capped; a bad limit is refused."""
        self.assertEqual(self.parse({"type": "history", "limit": 500}, max_history=100)["limit"], 100)
        self.assertEqual(self.parse({"type": "history"}, max_history=100)["limit"], 100)
        self.assertRefused({"type": "history", "limit": 0}, '"limit"')

    def test_history_pages_back_with_before(self) -> None:
        """``before`` asks for messages numbered below it; a bad one is refused."""
        self.assertEqual(self.parse({"type": "history", "before": 42})["before"], 42)
        self.assertIsNone(self.parse({"type": "history"})["before"])
        for bad in (0, -1, "42", 1.5, True, 2**60):
            self.assertRefused({"type": "history", "before": bad}, '"before"')

    def test_who_takes_a_cursor_and_a_limit(self) -> None:
        """``who`` pages with ``cursor`` (a string) and ``limit`` (capped at
        one page); bad ones are refused."""
        who = self.parse({"type": "who", "cursor": "n-7", "limit": 1000})
        self.assertEqual((who["cursor"], who["limit"]), ("n-7", MEMBERS_PAGE))
        self.assertEqual(self.parse({"type": "who"})["cursor"], None)
        self.assertRefused({"type": "who", "cursor": 7}, '"cursor"')
        self.assertRefused({"type": "who", "cursor": "x" * 1025}, '"cursor"')
        self.assertRefused({"type": "who", "limit": 0}, '"limit"')

    def test_bad_rooms(self) -> None:
        """Rooms must be short names of letters, digits, '_', '.' and '-'."""
        self.assertRefused({"type": "join"}, '"room"')
        self.assertRefused({"type": "join", "room": ""}, "1 to 64")
        self.assertRefused({"type": "join", "room": "x" * 65}, "1 to 64")
        self.assertRefused({"type": "join", "room": "a b", "ref": "r"}, "letters", ref="r")
        self.assertRefused({"type": "message", "text": "x", "room": 5}, "string")

    def test_bad_since(self) -> None:
        """A since must hold a string epoch and a non-negative integer seq."""
        for since in ({"epoch": "e"}, {"epoch": 1, "seq": 1}, {"epoch": "e", "seq": -1}, 3):
            self.assertRefused({"type": "join", "room": "a", "since": since}, '"since"')

    def test_bad_refs(self) -> None:
        """A ref must be a short string or an integer."""
        self.assertRefused({"type": "message", "text": "x", "ref": [1]}, '"ref"')
        self.assertRefused({"type": "message", "text": "x", "ref": "r" * 129}, '"ref"')

    def test_malformed_json(self) -> None:
        """Text that is not JSON is refused as malformed."""
        self.assertRefused(b"hello", "malformed JSON")

    def test_not_an_object(self) -> None:
        """JSON that is not an object is refused, naming what it was."""
        self.assertRefused(b"[1, 2]", "JSON object", "list")

    def test_missing_type(self) -> None:
        """An object without a type is refused, listing the known types."""
        self.assertRefused({"text": "x"}, '"type"', "message", "join")

    def test_unknown_type_keeps_the_ref(self) -> None:
        """An unknown type is refused, naming it, with the ref echoed."""
        self.assertRefused({"type": "shout", "ref": "a1"}, "'shout'", ref="a1")

    def test_message_without_text(self) -> None:
        """A message needs a text string."""
        self.assertRefused({"type": "message"}, '"text"')
        self.assertRefused({"type": "message", "text": 5}, '"text"')

    def test_refresh_carries_a_bounded_token(self) -> None:
        """A refresh needs a token string of 1 to 8192 characters; the ref is kept on refusal."""
        self.assertEqual(
            self.parse({"type": "refresh", "token": "a.b.c", "ref": 9}),
            {"type": "refresh", "token": "a.b.c", "ref": 9},
        )
        self.assertEqual(len(self.parse({"type": "refresh", "token": "t" * 8192})["token"]), 8192)
        for bad in (None, "", 5, ["a.b.c"]):
            self.assertRefused({"type": "refresh", "token": bad, "ref": 1}, '"token"', ref=1)
        self.assertRefused({"type": "refresh", "token": "t" * 8193}, "at most 8192")


class ClientNumberTests(SynchronousTestCase):
    """Numbers from clients are ASCII digits within what JavaScript holds,
    wherever they come from: anything else is a clear refusal, never a
    server error."""

    def test_since_param(self):
        self.assertEqual(parse_since_param("a1b2:17"), ("a1b2", 17))
        self.assertEqual(parse_since_param("local-n-2:0"), ("local-n-2", 0))
        for bad in (
            "abc:\u00b2",  # superscript two: isdigit() says yes, int() says no
            "abc:\u0663",  # Arabic-Indic three: int() reads it as 3
            "e:" + "9" * 5000,  # int() refuses more than 4300 digits
            "e:" + str(2**53 + 1),
            "e:-1",
            ":1",
            "e:",
            "e 1:2",
            "\x1b[2J:1",
            "e" * 129 + ":1",
        ):
            self.assertIsNone(parse_since_param(bad), bad[:20])

    def test_since_object(self):
        for since in (
            {"epoch": "e", "seq": 2**53 + 1},
            {"epoch": "e", "seq": 10**100},
            {"epoch": "e" * 129, "seq": 1},
            {"epoch": "e", "seq": -1},
            {"epoch": "e", "seq": True},
        ):
            payload = json.dumps({"type": "join", "room": "r", "since": since, "ref": 7})
            error = self.assertRaises(BadRequest, parse_client_message, payload.encode())
            self.assertEqual(error.ref, 7)
            self.assertIn('"since" must be', str(error))
        parsed = parse_client_message(
            json.dumps({"type": "join", "room": "r", "since": {"epoch": "e", "seq": 2**53}}).encode()
        )
        self.assertEqual(parsed["since"], ("e", 2**53))

    def test_huge_numbers_are_malformed_json_or_refused(self):
        for payload in (
            b'{"type":"message","text":"x","ref":' + b"9" * 5000 + b"}",
            b'{"type":"history","room":"r","limit":1e400}',
            b'{"type":"history","room":"r","limit":' + b"9" * 100 + b"}",
            b'{"type":"history","room":"r","before":-3}',
        ):
            self.assertRaises(BadRequest, parse_client_message, payload)
