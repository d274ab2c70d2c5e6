"""
Tests for :mod:`broadcaster.http.api` on a real server: ``POST
/api/publish`` with good, wrong and missing keys, bad bodies, and messages
reaching clients; the rooms' presence and history, paged, read without
creating anything; ``POST /api/disconnect`` closing signed-in users' and
single clients' connections, and bans refusing their return for a while.
"""

from __future__ import annotations

import json
import os
import time

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.http.api import key_id
from broadcaster.protocols.websocket import DISCONNECTED
from broadcaster.service.tap import Options
from tests.http.test_tokens import SECRET, hs256, live_claims
from tests.support import RecordingClientProtocol, connect_client, start_server
from tests.test_rooms import join_chat, of_type, read_until

KEY = "k-5b0e9d2a7c"
OTHER_KEY = "k-other-41d7"


@inlineCallbacks
def api_request(port, path, key=KEY, method="GET", data=None):
    """
    :return: ``(status, headers, JSON body or None)`` of ``/api/<path>``.
    """
    headers = {} if key is None else {"Authorization": "Bearer " + key}
    response = yield treq.request(
        method,
        "http://127.0.0.1:{}/api/{}".format(port, path).encode("ascii"),
        data=data,
        headers=headers,
        persistent=False,
    )
    content = yield response.content()
    try:
        answer = json.loads(content)
    except ValueError:
        answer = None
    return response.code, response.headers, answer


def publish(port, body, key=KEY, method="POST", raw=None):
    """
    :return: a Deferred firing with ``(status, headers, JSON body or None)``.
    """
    data = raw if raw is not None else json.dumps(body).encode()
    return api_request(port, "publish", key, method, data)


class PublishTests(TestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def tearDown(self) -> None:
        for event in self.logged:
            text = repr(event) + (formatEvent(event) or "")
            for key in (KEY, OTHER_KEY, "wrong-key"):
                self.assertNotIn(key, text, "an API key was logged")

    @inlineCallbacks
    def start(self, *args):
        service, port = yield start_server(self, ["--api-key", OTHER_KEY, "--api-key", KEY, *args])
        return port

    @inlineCallbacks
    def test_published_message_reaches_clients(self):
        """A good key's message is numbered in the lobby and reaches clients from "server"."""
        port = yield self.start()
        client = yield connect_client(self, port, json_mode=True)
        welcome = yield client.next_json()
        yield client.next_json()  # its own join
        status, _, answer = yield publish(port, {"text": "deploy finished"})
        self.assertEqual(status, 202)
        self.assertEqual(
            answer,
            {
                "id": "{}:{}".format(welcome["epoch"], welcome["seq"] + 1),
                "room": "lobby",
                "seq": welcome["seq"] + 1,
                "epoch": welcome["epoch"],
            },
        )
        message = yield client.next_json()
        self.assertEqual(
            {k: message[k] for k in ("type", "room", "from", "name", "text", "seq", "epoch")},
            {
                "type": "message",
                "room": "lobby",
                "from": "server",
                "name": "server",
                "text": "deploy finished",
                "seq": answer["seq"],
                "epoch": answer["epoch"],
            },
        )

    @inlineCallbacks
    def test_room_need_not_have_members(self):
        """Publishing to an empty room numbers and keeps the message for who joins later."""
        port = yield self.start()
        status, _, answer = yield publish(port, {"text": "first", "room": "ops"})
        self.assertEqual((status, answer["room"], answer["seq"]), (202, "ops", 1))
        client = yield connect_client(self, port, json_mode=True)
        yield client.next_json()  # welcome
        yield client.next_json()  # join lobby
        client.send_json({"type": "join", "room": "ops"})
        client.send_json({"type": "history", "room": "ops"})
        while True:
            event = yield client.next_json()
            if event["type"] == "history":
                break
        self.assertEqual(
            [(m["from"], m["text"], m["seq"]) for m in event["messages"]], [("server", "first", 1)]
        )

    @inlineCallbacks
    def test_missing_or_wrong_key_is_401(self):
        """No key, a wrong key or another scheme get 401 with WWW-Authenticate: Bearer."""
        port = yield self.start()
        for key, challenge in (
            (None, b'Bearer realm="broadcaster"'),
            ("wrong-key", b'Bearer realm="broadcaster", error="invalid_token"'),
        ):
            status, headers, answer = yield publish(port, {"text": "x"}, key=key)
            self.assertEqual(status, 401)
            self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [challenge])
            self.assertIn("API key", answer["error"])
        response = yield treq.post(
            "http://127.0.0.1:{}/api/publish".format(port),
            data=b'{"text": "x"}',
            headers={"Authorization": "Basic " + KEY},
            persistent=False,
        )
        yield response.content()
        self.assertEqual(response.code, 401)

    @inlineCallbacks
    def test_bad_bodies_are_400_with_a_reason(self):
        """Malformed JSON, a missing text or a bad room are refused with 400 saying why."""
        port = yield self.start()
        cases = [
            (b"{not json", "malformed JSON"),
            (b"[1, 2]", "JSON object"),
            (b'{"room": "lobby"}', '"text"'),
            (b'{"text": 5}', '"text"'),
            (b'{"text": "x", "room": "no spaces"}', "room name"),
        ]
        for raw, reason in cases:
            status, _, answer = yield publish(port, None, raw=raw)
            self.assertEqual(status, 400, raw)
            self.assertIn(reason, answer["error"])

    @inlineCallbacks
    def test_body_larger_than_max_message_size_is_413(self):
        """A body over --max-message-size is refused with 413."""
        port = yield self.start("--max-message-size", "100")
        status, _, answer = yield publish(port, {"text": "x" * 200})
        self.assertEqual(status, 413)
        self.assertIn("100 bytes", answer["error"])
        status, _, _ = yield publish(port, {"text": "x" * 50})
        self.assertEqual(status, 202)

    @inlineCallbacks
    def test_only_post(self):
        """Other methods get 405 and Allow: POST."""
        port = yield self.start()
        status, headers, _ = yield publish(port, None, method="GET", raw=b"")
        self.assertEqual(status, 405)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"POST"])

    @inlineCallbacks
    def test_absent_without_keys(self):
        """Without any key the API does not exist: 404."""
        service, port = yield start_server(self)
        status, _, _ = yield publish(port, {"text": "x"})
        self.assertEqual(status, 404)

    @inlineCallbacks
    def test_keys_from_a_file(self):
        """--api-key-file keys work; blank lines and comments are skipped."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# deploy bot\n\n  {}  \n".format(KEY))
        service, port = yield start_server(self, ["--api-key-file", path])
        status, _, _ = yield publish(port, {"text": "x"})
        self.assertEqual(status, 202)
        status, _, _ = yield publish(port, {"text": "x"}, key="# deploy bot")
        self.assertEqual(status, 401)


def key_file(testcase) -> str:
    """An --api-key-file holding :data:`KEY`."""
    path = testcase.mktemp()
    with open(path, "w") as f:
        f.write(KEY + "\n")
    return path


class RoomsTests(TestCase):
    """GET /api/rooms/<room>/presence and /history."""

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self, ["--api-key-file", key_file(self)])

    @inlineCallbacks
    def test_presence_pages_through_the_members(self):
        """Presence answers the room's count and one page of members in id
        order; its next is the cursor of the following page, null on the last."""
        joined = []
        for name in ("ann", "bob", "cy"):
            client, welcome = yield join_chat(self, self.port, name)
            client.send_json({"type": "join", "room": "dev"})
            yield read_until(client, of_type("presence", room="dev"))
            joined.append((welcome["id"], name))
        joined.sort()
        status, _, first = yield api_request(self.port, "rooms/dev/presence?limit=2")
        self.assertEqual(status, 200)
        self.assertEqual(
            first,
            {
                "type": "presence",
                "room": "dev",
                "members": [{"id": i, "name": n} for i, n in joined[:2]],
                "count": 3,
                "next": joined[1][0],
                "cursor": None,
            },
        )
        status, _, last = yield api_request(
            self.port, "rooms/dev/presence?limit=2&cursor=" + first["next"]
        )
        self.assertEqual((status, last["count"], last["next"]), (200, 3, None))
        self.assertEqual(last["members"], [{"id": joined[2][0], "name": joined[2][1]}])
        status, _, everyone = yield api_request(self.port, "rooms/dev/presence?cursor=")
        self.assertEqual([m["id"] for m in everyone["members"]], [i for i, _ in joined])

    @inlineCallbacks
    def test_history_is_what_a_member_sees(self):
        """History answers the room's last messages as a member's history
        request gets them, and before pages further back until more is false."""
        for i in range(5):
            yield publish(self.port, {"text": "m{}".format(i), "room": "ops"})
        status, _, newest = yield api_request(self.port, "rooms/ops/history?limit=2")
        self.assertEqual(status, 200)
        self.assertEqual(
            (newest["type"], newest["room"], newest["more"]), ("history", "ops", True)
        )
        self.assertEqual([m["text"] for m in newest["messages"]], ["m3", "m4"])
        member, _ = yield join_chat(self, self.port)
        member.send_json({"type": "join", "room": "ops"})
        member.send_json({"type": "history", "room": "ops", "limit": 2})
        seen = (yield read_until(member, of_type("history")))[-1]
        self.assertEqual(seen, newest)
        texts = []
        page = newest
        while True:
            texts[:0] = [m["text"] for m in page["messages"]]
            if not page["more"]:
                break
            status, _, page = yield api_request(
                self.port,
                "rooms/ops/history?limit=2&before={}".format(page["messages"][0]["seq"]),
            )
        self.assertEqual(texts, ["m0", "m1", "m2", "m3", "m4"])

    @inlineCallbacks
    def test_history_is_bounded_in_bytes(self):
        """A history answer holds no more message bytes than a member's
        history reply may, and says there is more."""
        for i in range(5):
            status, _, _ = yield publish(self.port, {"text": str(i) * 60000})
            self.assertEqual(status, 202)
        status, _, answer = yield api_request(self.port, "rooms/lobby/history")
        self.assertEqual((status, answer["more"]), (200, True))
        self.assertEqual([m["text"][0] for m in answer["messages"]], ["1", "2", "3", "4"])

    @inlineCallbacks
    def test_bad_room_or_numbers_are_400(self):
        """A bad room name, a limit or before that is not ASCII digits from
        1 to 2**53, a parameter given twice, or a bad cursor get 400 saying why."""
        cases = [
            ("rooms/no%20spaces/history", "room name"),
            ("rooms/-dash/presence", "room name"),
            ("rooms/{}/presence".format("r" * 65), "room name"),
            ("rooms/lobby/history?limit=0", "limit"),
            ("rooms/lobby/history?limit=-1", "limit"),
            ("rooms/lobby/history?limit=ten", "limit"),
            ("rooms/lobby/history?limit=%D9%A3", "limit"),
            ("rooms/lobby/history?limit=", "limit"),
            ("rooms/lobby/history?before=9007199254740993", "before"),
            ("rooms/lobby/history?limit=1&limit=2", "at most once"),
            ("rooms/lobby/presence?limit=1.5", "limit"),
            ("rooms/lobby/presence?cursor=" + "c" * 129, "cursor"),
            ("rooms/lobby/presence?cursor=%FF", "UTF-8"),
        ]
        for path, reason in cases:
            status, headers, answer = yield api_request(self.port, path)
            self.assertEqual(status, 400, path)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertIn(reason, answer["error"], path)

    @inlineCallbacks
    def test_no_key_is_401(self):
        """Without a key, or with a wrong one, neither endpoint answers but 401."""
        for path in ("rooms/lobby/presence", "rooms/lobby/history"):
            for key in (None, "wrong-key"):
                status, headers, answer = yield api_request(self.port, path, key=key)
                self.assertEqual(status, 401, (path, key))
                self.assertIn(b"Bearer", headers.getRawHeaders(b"www-authenticate")[0])

    @inlineCallbacks
    def test_unknown_paths_and_methods(self):
        """Another path under a room is 404; another method than GET is 405."""
        status, _, _ = yield api_request(self.port, "rooms/lobby/members")
        self.assertEqual(status, 404)
        status, _, _ = yield api_request(self.port, "rooms/lobby")
        self.assertEqual(status, 404)
        status, headers, _ = yield api_request(self.port, "rooms/lobby/history", method="POST")
        self.assertEqual((status, headers.getRawHeaders(b"allow")), (405, [b"GET"]))

    @inlineCallbacks
    def test_unknown_room_is_empty_and_stays_unknown(self):
        """Asking about a room nobody is in and nothing was said in answers
        nobody and nothing, and leaves the server keeping nothing for it."""
        hub = self.service.hub
        histories = hub.backplane.histories
        kept = len(histories)
        status, _, presence = yield api_request(self.port, "rooms/nowhere/presence")
        self.assertEqual(
            (status, presence["count"], presence["members"], presence["next"]),
            (200, 0, [], None),
        )
        status, _, history = yield api_request(self.port, "rooms/nowhere/history?before=7")
        self.assertEqual((status, history["messages"], history["more"]), (200, [], False))
        self.assertIsNone(histories.peek("nowhere"))
        self.assertEqual(len(histories), kept)
        self.assertNotIn("nowhere", hub.rooms())


def token_path(user: str) -> str:
    """The handshake path of a client signed in as ``user`` with a token."""
    return "/?token=" + hs256(live_claims(sub=user))


@inlineCallbacks
def sign_in(testcase, port: int, user: str):
    """
    Connect a JSON client signed in as ``user`` and read its welcome.

    :return: a Deferred firing with ``(client, its id)``.
    """
    client = yield connect_client(testcase, port, json_mode=True, path=token_path(user))
    welcome = yield client.next_json()
    return client, welcome["id"]


@inlineCallbacks
def refusal(port: int, path: str):
    """
    Try a WebSocket handshake that must be refused.

    :return: why the client says it failed (the HTTP status and reason).
    """
    factory = WebSocketClientFactory("ws://127.0.0.1:{}{}".format(port, path))
    factory.protocol = RecordingClientProtocol
    client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    try:
        yield client.opened
    except ConnectionError:
        return client.wasNotCleanReason or ""
    client.sendClose()
    raise AssertionError("the handshake was accepted")


def disconnect(port, body, key=KEY):
    """POST ``body`` to /api/disconnect: a Deferred firing as :func:`api_request`."""
    return api_request(port, "disconnect", key, "POST", json.dumps(body).encode())


class DisconnectTests(TestCase):
    """POST /api/disconnect, and the bans it sets."""

    @inlineCallbacks
    def setUp(self):
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write(SECRET + "\n")
        self.service, self.port = yield start_server(
            self, ["--api-key-file", key_file(self), "--jwt-secret-file", secret]
        )

    def tearDown(self):
        for event in self.logged:
            self.assertNotIn(KEY, repr(event) + (formatEvent(event) or ""), "the key was logged")

    def sign_in(self, user):
        return sign_in(self, self.port, user)

    @inlineCallbacks
    def test_disconnect_by_user_closes_all_its_connections(self):
        """Every connection of the user is closed with 4003 and the reason;
        another user's stays, and the disconnect is logged with the key's id."""
        ann1, _ = yield self.sign_in("u-ann")
        ann2, _ = yield self.sign_in("u-ann")
        bob, _ = yield self.sign_in("u-bob")
        status, _, answer = yield disconnect(self.port, {"user": "u-ann", "reason": "spam"})
        self.assertEqual((status, answer), (200, {"disconnected": 2}))
        for client in (ann1, ann2):
            self.assertEqual((yield client.closed), (True, DISCONNECTED, "spam"))
        bob.send_json({"type": "message", "text": "still here"})
        events = yield read_until(bob, of_type("message", text="still here"))
        self.assertLessEqual({e["type"] for e in events}, {"join", "leave", "message"})
        self.assertFalse(bob.closed.called)
        [logged] = [e for e in self.logged if "[DISCONNECT BY SERVER]" in e["log_format"]]
        self.assertEqual(
            (logged["log_level"].name, logged["key"], logged["target"], logged["count"]),
            ("warn", key_id(KEY), "user 'u-ann'", 2),
        )

    @inlineCallbacks
    def test_disconnect_by_client_id_closes_that_one(self):
        """A client id closes that connection alone, with the default reason;
        asking again finds nothing left to close."""
        first, first_id = yield self.sign_in("u-ann")
        second, _ = yield self.sign_in("u-ann")
        status, _, answer = yield disconnect(self.port, {"client": first_id})
        self.assertEqual((status, answer), (200, {"disconnected": 1}))
        self.assertEqual(
            (yield first.closed), (True, DISCONNECTED, "disconnected by the server")
        )
        status, _, answer = yield disconnect(self.port, {"client": first_id})
        self.assertEqual((status, answer), (200, {"disconnected": 0}))
        self.assertFalse(second.closed.called)

    @inlineCallbacks
    def test_bad_requests_are_refused(self):
        """A body that names nobody, or both, or has a bad reason or ban, is
        400 saying why; no key is 401; another method than POST is 405."""
        cases = [
            ({}, '"user" or a "client"'),
            ({"user": "u-ann", "client": "x-1"}, '"user" or a "client"'),
            ({"user": 5}, '"user"'),
            ({"user": " "}, '"user"'),
            ({"client": "c" * 129}, '"client"'),
            ({"user": "u-ann", "reason": "é" * 62}, '"reason"'),
            ({"user": "u-ann", "reason": ""}, '"reason"'),
            ({"user": "u-ann", "reason": "line\nbreak"}, "control characters"),
            ({"user": "u-ann", "ban_seconds": -1}, '"ban_seconds"'),
            ({"user": "u-ann", "ban_seconds": 86401}, '"ban_seconds"'),
            ({"user": "u-ann", "ban_seconds": True}, '"ban_seconds"'),
            ({"user": "u-ann", "ban_seconds": 1.5}, '"ban_seconds"'),
            ({"user": "u-ann", "ban_seconds": "60"}, '"ban_seconds"'),
            ({"client": "x-1", "ban_seconds": 60}, 'needs a "user"'),
            ([1], "JSON object"),
        ]
        for body, reason in cases:
            status, _, answer = yield disconnect(self.port, body)
            self.assertEqual(status, 400, body)
            self.assertIn(reason, answer["error"], body)
        status, _, _ = yield disconnect(self.port, {"user": "u-ann"}, key=None)
        self.assertEqual(status, 401)
        status, headers, _ = yield api_request(self.port, "disconnect")
        self.assertEqual((status, headers.getRawHeaders(b"allow")), (405, [b"POST"]))
        self.assertEqual(len(self.service.hub.bans), 0)

    @inlineCallbacks
    def test_ban_refuses_the_user_until_it_ends(self):
        """A banned user's reconnects are refused with 403 and why, other
        users still get in, and once the ban's seconds pass the user does too."""
        ann, _ = yield self.sign_in("u-ann")
        status, _, answer = yield disconnect(self.port, {"user": "u-ann", "ban_seconds": 1})
        self.assertEqual((status, answer), (200, {"disconnected": 1}))
        banned_at = time.monotonic()
        yield ann.closed
        reason = yield refusal(self.port, token_path("u-ann"))
        self.assertIn("403", reason)
        self.assertIn("disconnected by the server; try again later", reason)
        yield self.sign_in("u-bob")
        deadline = time.monotonic() + 10
        while True:
            try:
                yield self.sign_in("u-ann")
                break
            except ConnectionError:
                self.assertLess(time.monotonic(), deadline, "still refused 10 s after a 1 s ban")
                yield deferLater(reactor, 0.05, lambda: None)
        self.assertGreaterEqual(time.monotonic() - banned_at, 0.9)
        self.assertGreaterEqual(self.service.hub.stats.refused_handshakes["banned"], 1)


class OptionsTests(SynchronousTestCase):
    def parse(self, *args):
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_key_file_must_exist(self):
        """A missing --api-key-file is refused, naming the flag."""
        error = self.assertRaises(
            UsageError, self.parse, "--api-key-file", os.path.join(self.mktemp(), "keys")
        )
        self.assertIn("--api-key-file", str(error))

    def test_key_file_must_hold_a_key(self):
        """An --api-key-file with no keys is refused rather than silently turning the API off."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# nothing yet\n")
        error = self.assertRaises(UsageError, self.parse, "--api-key-file", path)
        self.assertIn("holds no keys", str(error))

    def test_keys_are_collected(self):
        """--api-key is repeatable and joins the file's keys."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from-file\n")
        options = self.parse("--api-key", "a", "--api-key", "b", "--api-key-file", path)
        self.assertEqual(options["api-keys"], ["a", "b", "from-file"])
