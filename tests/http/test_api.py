"""
Tests for :mod:`broadcaster.http.api`: ``POST /api/publish`` on a real server,
with good, wrong and missing keys, bad bodies, and messages reaching clients.
"""

from __future__ import annotations

import json
import os

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.service.tap import Options
from tests.support import connect_client, start_server

KEY = "k-5b0e9d2a7c"
OTHER_KEY = "k-other-41d7"


@inlineCallbacks
def publish(port, body, key=KEY, method="POST", raw=None):
    """
    :return: ``(status, headers, JSON body or None)``.
    """
    headers = {}
    if key is not None:
        headers["Authorization"] = "Bearer " + key
    data = raw if raw is not None else json.dumps(body).encode()
    response = yield treq.request(
        method,
        "http://127.0.0.1:{}/api/publish".format(port),
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
