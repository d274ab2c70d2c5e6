"""
Tests for ``GET /events`` (:mod:`broadcaster.http.events`,
:mod:`broadcaster.protocols.stream`): a Server-Sent Events stream read by
a real HTTP client over TCP, next to real WebSocket clients, including
recovery with ``Last-Event-ID``, sign-in, rights and hostile readers.
"""

import json

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.protocols.stream import StreamRequestError, parse_stream_request, stream_id
from tests.http.test_api import disconnect, key_file
from tests.http.test_tokens import SECRET, hs256, live_claims
from tests.support import start_server, wait_for
from tests.test_rooms import join_chat, of_type, read_until


class StreamClient(Protocol):
    """
    A plain HTTP/1.1 client of ``GET /events``, reading the stream as a
    script would: the status, the headers, and each event as it arrives.
    """

    def __init__(self, path: str, headers=(), method: str = "GET", extra: bytes = b"") -> None:
        self.path = path
        self.method = method
        #: Sent right after the request (pipelined requests, junk).
        self.after = extra
        self.extra = list(headers)
        self.raw = b""
        self.head = None
        self.status = None
        self.headers = {}
        self.body = b""
        self.chunked = False
        self.events = []
        self.comments = []
        self.closed = Deferred()

    def connectionMade(self) -> None:
        lines = [
            "{} {} HTTP/1.1".format(self.method, self.path), "Host: 127.0.0.1", *self.extra, "", ""
        ]
        self.transport.write("\r\n".join(lines).encode("utf-8") + self.after)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.head is None:
            head, separator, rest = self.raw.partition(b"\r\n\r\n")
            if not separator:
                return
            self.head = head.decode("latin-1")
            status_line, *header_lines = self.head.split("\r\n")
            self.status = int(status_line.split()[1])
            for line in header_lines:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self.chunked = self.headers.get("transfer-encoding") == "chunked"
            self.raw = rest
        if self.chunked:
            while True:
                size_line, separator, rest = self.raw.partition(b"\r\n")
                if not separator:
                    break
                size = int(size_line, 16)
                if len(rest) < size + 2:
                    break
                self.body += rest[:size]
                self.raw = rest[size + 2:]
        else:
            self.body += self.raw
            self.raw = b""
        self._parse()

    def _parse(self) -> None:
        while b"\n\n" in self.body:
            block, _, self.body = self.body.partition(b"\n\n")
            event = {"event": "message"}
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                field, _, value = line.partition(": ")
                event[field] = value
            if "data" in event:
                event["data"] = json.loads(event["data"])
                self.events.append(event)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)

    def named(self, name: str):
        return [e for e in self.events if e["event"] == name]

    def texts(self):
        return [e["data"]["text"] for e in self.named("message")]


@inlineCallbacks
def open_stream(testcase, port: int, path: str = "/events", headers=(), **kwargs):
    """
    Connect a :class:`StreamClient`, closed when ``testcase`` ends, and
    wait for its answer's head.
    """
    client = StreamClient(path, headers, **kwargs)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)

    def close():
        if not client.closed.called:
            client.transport.abortConnection()
        return client.closed

    testcase.addCleanup(close)
    yield wait_for(lambda: client.status is not None or client.closed.called, what="an answer")
    return client


class ParsingTests(SynchronousTestCase):
    def test_rooms_and_last_event_id(self):
        self.assertEqual(parse_stream_request([], None, 10), (["lobby"], {}))
        self.assertEqual(
            parse_stream_request(["dev", "ops", "dev"], "dev=e1:4, ops=e2:0", 10),
            (["dev", "ops"], {"dev": ("e1", 4), "ops": ("e2", 0)}),
        )
        self.assertEqual(parse_stream_request(["dev"], "e1:4", 10), (["dev"], {"dev": ("e1", 4)}))
        # Rooms it does not stream are ignored.
        self.assertEqual(parse_stream_request(["dev"], "ops=e1:4", 10), (["dev"], {}))

    def test_bad_requests(self):
        for rooms, last, reason in (
            (["bad room"], None, "?room="),
            (["a", "b", "c"], None, "at most 2 rooms"),
            (["a", "b"], "e1:4", "must name each room"),
            (["a"], "e1:x", "must be the id"),
            (["a"], "a=" + "e" * 9000 + ":1", "too long"),
        ):
            error = self.assertRaises(StreamRequestError, parse_stream_request, rooms, last, 2)
            self.assertIn(reason, str(error))

    def test_ids(self):
        self.assertEqual(stream_id({"dev": ("e1", 4)}), "e1:4")
        self.assertEqual(stream_id({"dev": ("e1", 4), "ops": ("e2", 0)}), "dev=e1:4,ops=e2:0")


class StreamTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def start(self, *args):
        self.service, self.port = yield start_server(self, args)
        return self.service

    @inlineCallbacks
    def say(self, client, text, room="lobby"):
        """Send ``text`` and wait until it is numbered."""
        client.send_json({"type": "message", "room": room, "text": text, "ref": text})
        yield read_until(client, of_type("ack", ref=text))

    @inlineCallbacks
    def test_a_stream_shows_the_conversation(self):
        """The welcome, then joins and messages as they happen, each
        message with its epoch:seq as id and the JSON protocol's object."""
        yield self.start()
        stream = yield open_stream(self, self.port, "/events?room=lobby")
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.headers["content-type"], "text/event-stream; charset=utf-8")
        yield wait_for(lambda: stream.named("welcome"), what="the welcome")
        welcome = stream.named("welcome")[0]
        self.assertEqual(welcome["retry"], "2000")
        ann, _ = yield join_chat(self, self.port, "ann")
        yield self.say(ann, "hello stream")
        yield wait_for(lambda: "hello stream" in stream.texts(), what="the message")
        message = stream.named("message")[0]
        self.assertEqual(message["id"], "{epoch}:{seq}".format(**message["data"]))
        self.assertEqual(message["data"]["name"], "ann")
        self.assertIn("ann", [e["data"]["name"] for e in stream.named("join")])
        self.assertEqual(self.service.hub.member(welcome["data"]["id"]).kind, "sse")
        metrics = yield (yield treq.get("http://127.0.0.1:{}/metrics".format(self.port), persistent=False)).text()
        self.assertIn('broadcaster_connections{kind="sse"} 1.0', metrics)

    @inlineCallbacks
    def test_last_event_id_recovers_what_was_missed(self):
        """A stream reopened with the last id it saw gets exactly the
        messages sent meanwhile, then recovered (complete), then live ones."""
        yield self.start()
        ann, _ = yield join_chat(self, self.port, "ann")
        first = yield open_stream(self, self.port, "/events")
        yield self.say(ann, "m0")
        yield wait_for(lambda: first.texts() == ["m0"], what="m0")
        last_id = first.named("message")[-1]["id"]
        first.transport.loseConnection()
        yield first.closed
        for text in ("m1", "m2", "m3"):
            yield self.say(ann, text)
        again = yield open_stream(self, self.port, "/events", ["Last-Event-ID: " + last_id])
        yield wait_for(lambda: again.named("recovered"), what="the end of the replay")
        yield self.say(ann, "m4")
        yield wait_for(lambda: "m4" in again.texts(), what="m4 live")
        self.assertEqual(again.texts(), ["m1", "m2", "m3", "m4"])
        self.assertEqual(again.named("recovered")[0]["data"]["complete"], True)
        # The replay's ids carry on from the one given.
        epoch, seq = last_id.split(":")
        self.assertEqual(
            [e["id"] for e in again.named("message")],
            ["{}:{}".format(epoch, int(seq) + i) for i in (1, 2, 3, 4)],
        )

    @inlineCallbacks
    def test_several_rooms(self):
        """A stream of two rooms gets both, and its ids name each room."""
        yield self.start()
        ann, _ = yield join_chat(self, self.port, "ann")
        ann.send_json({"type": "join", "room": "dev"})
        yield read_until(ann, of_type("presence", room="dev"))
        stream = yield open_stream(self, self.port, "/events?room=lobby&room=dev")
        yield wait_for(lambda: stream.named("welcome"), what="the welcome")
        yield self.say(ann, "in lobby")
        yield self.say(ann, "in dev", room="dev")
        yield wait_for(lambda: len(stream.texts()) == 2, what="both messages")
        last = stream.named("message")[-1]
        lobby = stream.named("message")[0]["data"]
        self.assertEqual(
            last["id"],
            "lobby={}:{},dev={}:{}".format(
                lobby["epoch"], lobby["seq"], last["data"]["epoch"], last["data"]["seq"]
            ),
        )

    @inlineCallbacks
    def test_bad_requests_are_answered_400_and_the_rest_go_on(self):
        yield self.start("--max-rooms-per-client", "2")
        ann, _ = yield join_chat(self, self.port, "ann")
        for path, headers, status, reason in (
            ("/events?room=no%20spaces", [], 400, "?room="),
            ("/events?room=a&room=b&room=c", [], 400, "at most 2 rooms"),
            ("/events", ["Last-Event-ID: \x01junk"], 400, "Last-Event-ID"),
            ("/events", ["Origin: http://evil.example"], 403, "not allowed to connect"),
        ):
            refused = yield open_stream(self, self.port, path, headers)
            yield wait_for(lambda: refused.body, what="the refusal's body")
            self.assertEqual(refused.status, status, path)
            self.assertIn(reason, refused.body.decode(), path)
        yield self.say(ann, "still here")

    @inlineCallbacks
    def test_a_reader_that_stops_is_cut_and_the_others_get_everything(self):
        """A stream that never reads is cut at --max-buffer; a stream that
        reads gets every message meanwhile."""
        service = yield self.start(
            "--max-buffer", "65536", "--max-image-size", "65536", "--rate", "0"
        )
        stalled = yield open_stream(self, self.port, "/events")
        stalled.transport.pauseProducing()
        honest = yield open_stream(self, self.port, "/events")
        yield wait_for(lambda: honest.named("welcome"), what="the honest stream's welcome")
        ann, _ = yield join_chat(self, self.port, "ann")
        # 20 MB: more than loopback's socket buffers hold.
        texts = ["{:04d} {}".format(i, "x" * 8000) for i in range(2500)]
        for text in texts:
            ann.send_json({"type": "message", "text": text})
        yield wait_for(lambda: len(honest.texts()) == len(texts), timeout=60, what="every message")
        self.assertEqual(honest.texts(), texts)
        yield wait_for(lambda: service.hub.stats.slow_consumers == 1, what="the stalled stream cut")
        self.assertEqual(len(service.hub), 2)

    @inlineCallbacks
    def test_a_comment_keeps_the_stream_alive(self):
        yield self.start("--ping-interval", "1")
        stream = yield open_stream(self, self.port, "/events")
        yield wait_for(lambda: len(stream.comments) >= 2, what="two pings")
        self.assertEqual(stream.comments[:2], ["ping", "ping"])

    @inlineCallbacks
    def test_head_answers_without_a_stream(self):
        yield self.start()
        head = yield open_stream(self, self.port, "/events", method="HEAD")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.headers["content-type"], "text/event-stream; charset=utf-8")
        get = yield open_stream(self, self.port, "/events")
        yield wait_for(lambda: get.named("welcome"), what="a GET's welcome")
        # Only the GET is a member; the HEAD's answer had no body.
        self.assertEqual(len(self.service.hub), 1)
        self.assertEqual((head.body, head.events), (b"", []))

    @inlineCallbacks
    def test_a_client_that_goes_is_noticed_whatever_it_sent(self):
        """A stream request followed by 100 KB of pipelined junk, then the
        client closes: the server notices at once, without a ping."""
        yield self.start("--ping-interval", "0")
        junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3000
        stream = yield open_stream(self, self.port, "/events", extra=junk)
        yield wait_for(lambda: stream.named("welcome"), what="the welcome")
        self.assertEqual(len(self.service.hub), 1)
        stream.transport.loseConnection()
        yield wait_for(lambda: len(self.service.hub) == 0, what="the stream gone")

    @inlineCallbacks
    def test_an_id_ahead_of_the_room_starts_from_where_it_stands(self):
        """A Last-Event-ID beyond the room's sequence: the stream starts at
        the room's position, and its ids move with the messages."""
        yield self.start()
        ann, _ = yield join_chat(self, self.port, "ann")
        first = yield open_stream(self, self.port, "/events")
        yield wait_for(lambda: first.named("welcome"), what="the welcome")
        epoch = first.named("welcome")[0]["id"].split(":")[0]
        ahead = yield open_stream(
            self, self.port, "/events", ["Last-Event-ID: {}:999".format(epoch)]
        )
        yield wait_for(lambda: ahead.named("recovered"), what="the end of the replay")
        yield self.say(ann, "one")
        yield wait_for(lambda: ahead.texts() == ["one"], what="the message")
        self.assertEqual(ahead.named("message")[0]["id"], "{}:1".format(epoch))

    @inlineCallbacks
    def test_disconnected_by_the_server_api(self):
        """/api/disconnect ends a stream with a disconnected event."""
        yield self.start("--api-key-file", key_file(self))
        stream = yield open_stream(self, self.port, "/events")
        yield wait_for(lambda: stream.named("welcome"), what="the welcome")
        client = stream.named("welcome")[0]["data"]["id"]
        status, _, answer = yield disconnect(self.port, {"client": client, "reason": "enough"})
        self.assertEqual((status, answer), (200, {"disconnected": 1}))
        yield stream.closed
        self.assertEqual(stream.named("disconnected")[0]["data"]["reason"], "enough")


class SignedInStreamTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write(SECRET)
        self.service, self.port = yield start_server(
            self, ["--jwt-secret-file", secret, "--jwt-leeway", "0"]
        )

    def token(self, **claims):
        return hs256(live_claims(**claims))

    @inlineCallbacks
    def test_tokens_and_rights(self):
        """No token: 403.  A token in ?token= (what EventSource can send):
        streamed as its user.  A room it may not join: 403, saying which."""
        refused = yield open_stream(self, self.port, "/events")
        yield wait_for(lambda: refused.body, what="the refusal")
        self.assertEqual(refused.status, 403)
        token = self.token(sub="u-5", rooms={"desk-*": ["join"]})
        stream = yield open_stream(self, self.port, "/events?room=desk-1&token=" + token)
        yield wait_for(lambda: stream.named("welcome"), what="the welcome")
        self.assertEqual(stream.named("welcome")[0]["data"]["user"], "u-5")
        other = yield open_stream(
            self, self.port, "/events?room=desk-1&room=lobby", ["Authorization: Bearer " + token]
        )
        yield wait_for(lambda: other.body, what="the refusal")
        self.assertEqual(other.status, 403)
        self.assertIn("not allowed to join room 'lobby'", other.body.decode())
        self.assertNotIn(token, other.body.decode())

    @inlineCallbacks
    def test_the_stream_ends_with_its_token(self):
        """A stream signed in with a token is warned before its exp and
        ended at it, as a WebSocket would be closed."""
        import time as wall

        token = self.token(sub="u-5", exp=int(wall.time()) + 2)
        stream = yield open_stream(self, self.port, "/events?token=" + token)
        yield wait_for(lambda: stream.named("welcome"), what="the welcome")
        yield stream.closed.addTimeout(30, reactor)
        self.assertEqual([e["event"] for e in stream.events if e["event"] != "join"][-2:],
                         ["expiring", "disconnected"])
        self.assertEqual(stream.named("disconnected")[0]["data"]["reason"], "token expired")
        self.assertEqual(len(self.service.hub), 0)

    @inlineCallbacks
    def test_replay_needs_the_history_right(self):
        token = self.token(sub="u-5", rooms={"desk-1": ["join"]})
        stream = yield open_stream(
            self, self.port, "/events?room=desk-1&token=" + token, ["Last-Event-ID: e1:3"]
        )
        yield wait_for(lambda: stream.named("refused"), what="the refusal of the replay")
        self.assertIn("history", stream.named("refused")[0]["data"]["reason"])
        self.assertEqual(stream.named("recovered"), [])

