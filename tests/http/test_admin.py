"""
Tests for :mod:`broadcaster.http.admin`: the operator dashboard's page and
data endpoints over real HTTP, with real clients; when it is off; and its
nodes with a real Redis.  The page itself, in a browser, is tested in
:mod:`tests.test_admin_page`.
"""

import json

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from broadcaster.http.api import key_id
from tests.http.test_api import KEY, OTHER_KEY, api_request, key_file
from tests.http.test_events import open_stream
from tests.redis.test_redis import RedisTestCase, start_node
from tests.support import connect_client, start_server, wait_for

#: Everything under /admin.
ADMIN_PATHS = ("/admin", "/admin/", "/admin/admin.js", "/admin/admin.css", "/admin/stream", "/admin/nodes")


@inlineCallbacks
def get(port, path, key=None):
    """
    :return: ``(response, body bytes)`` of a GET, with ``key`` as a bearer.
    """
    headers = {} if key is None else {"Authorization": "Bearer " + key}
    response = yield treq.get(
        "http://127.0.0.1:{}{}".format(port, path), headers=headers, persistent=False
    )
    body = yield response.content()
    return response, body


def bearer(key=KEY):
    return ["Authorization: Bearer " + key]


class DashboardOffTests(TestCase):
    @inlineCallbacks
    def assert_absent(self, port):
        for path in ADMIN_PATHS:
            response, _ = yield get(port, path, KEY)
            self.assertEqual(response.code, 404, path)

    @inlineCallbacks
    def test_off_without_api_keys(self):
        """Without an API key there is nothing to sign in with: /admin does not exist."""
        service, port = yield start_server(self)
        self.assertIsNone(service.dashboard)
        yield self.assert_absent(port)

    @inlineCallbacks
    def test_off_with_no_admin(self):
        """--no-admin removes /admin (and its sampler) and leaves the server API."""
        service, port = yield start_server(self, ["--api-key-file", key_file(self), "--no-admin"])
        self.assertIsNone(service.dashboard)
        yield self.assert_absent(port)
        status, _, _ = yield api_request(port, "rooms/lobby/presence")
        self.assertEqual(status, 200)


class DashboardTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service, self.port = yield start_server(self, ["--api-key-file", key_file(self)])

    @inlineCallbacks
    def test_the_page_keeps_to_its_own_origin(self):
        """/admin and /admin/ are the page, under the chat page's strict
        policy; its script and style are served beside it; it holds no
        figure and no node name."""
        for path in ("/admin", "/admin/"):
            response, page = yield get(self.port, path)
            self.assertEqual(response.code, 200, path)
            self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/html"))
            (csp,) = response.headers.getRawHeaders("content-security-policy")
            for directive in ("default-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
                self.assertIn(directive, csp)
            self.assertNotIn(self.service.hub.node_id.encode(), page)
        for name, kind in [("admin.js", "javascript"), ("admin.css", "text/css")]:
            self.assertIn("/admin/{}".format(name).encode(), page)
            response, body = yield get(self.port, "/admin/" + name)
            self.assertEqual(response.code, 200, name)
            self.assertIn(kind, response.headers.getRawHeaders("content-type")[0])
            self.assertTrue(body)

    @inlineCallbacks
    def test_the_data_needs_a_key_and_reveals_nothing_without(self):
        """Without a key, or with a wrong one, the data endpoints answer
        401 with a bare error (no figure, no node), logged without the key."""
        for path in ("/admin/stream", "/admin/nodes"):
            for key, challenge in [(None, 'Bearer realm="broadcaster"'), (OTHER_KEY, "invalid_token")]:
                response, body = yield get(self.port, path, key)
                self.assertEqual(response.code, 401, (path, key))
                self.assertIn(challenge, response.headers.getRawHeaders("www-authenticate")[0])
                self.assertEqual(list(json.loads(body)), ["error"])
                self.assertNotIn(self.service.hub.node_id.encode(), body)
        refusals = [e for e in self.logged if "refused, API key" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 4)
        self.assertFalse(any(OTHER_KEY in repr(e) for e in self.logged))

    @inlineCallbacks
    def test_nodes(self):
        """/admin/nodes lists this node alone with its clients, and the
        in-process backplane's state."""
        yield connect_client(self, self.port, json_mode=True)
        response, body = yield get(self.port, "/admin/nodes", KEY)
        self.assertEqual(response.code, 200)
        node = self.service.hub.node_id
        self.assertEqual(
            json.loads(body),
            {
                "node": node,
                "backplane": {"kind": "local", "connected": True},
                "nodes": [
                    {"node": node, "connections": 1, "heartbeat_age": None, "here": True, "alive": True}
                ],
            },
        )

    @inlineCallbacks
    def test_the_stream_gives_the_backlog_then_every_second(self):
        """The stream opens with the samples kept, then a sample and the
        rooms every second; clients connecting show in its figures; the
        log names the key by its id only; a reader that goes is forgotten."""
        sampler = self.service.dashboard.sampler
        yield wait_for(lambda: sampler.samples(), what="a first sample")
        stream = yield open_stream(self, self.port, "/admin/stream", bearer())
        self.assertEqual(stream.status, 200)
        self.assertTrue(stream.headers["content-type"].startswith("text/event-stream"))
        yield wait_for(lambda: stream.named("backlog"), what="the backlog")
        [backlog] = stream.named("backlog")
        self.assertEqual(backlog["data"]["node"], self.service.hub.node_id)
        self.assertTrue(backlog["data"]["samples"])
        self.assertEqual(stream.events[0]["event"], "backlog")

        client = yield connect_client(self, self.port, json_mode=True)
        yield wait_for(
            lambda: any(e["data"]["connections"]["json"] == 1 for e in stream.named("sample")),
            what="a sample with the client",
        )
        rooms = stream.named("rooms")[-1]["data"]
        self.assertEqual(rooms["by_members"][0]["room"], "lobby")
        self.assertEqual(len(self.service.dashboard.feed), 1)

        opened = [e for e in self.logged if "opened the dashboard" in e.get("log_format", "")]
        self.assertEqual(opened[0]["key"], key_id(KEY))
        self.assertFalse(any(KEY in repr(e) for e in self.logged))
        stream.transport.loseConnection()
        yield stream.closed
        yield wait_for(lambda: len(self.service.dashboard.feed) == 0, what="the reader forgotten")
        self.assertIsNotNone(client)

    @inlineCallbacks
    def test_the_stream_ends_when_the_server_stops(self):
        """Stopping the server ends the open streams (the page reconnects)."""
        stream = yield open_stream(self, self.port, "/admin/stream", bearer())
        yield wait_for(lambda: stream.named("backlog"), what="the backlog")
        yield self.service.stopService()
        yield stream.closed

    @inlineCallbacks
    def test_announcements_are_logged_with_the_key_id(self):
        """The dashboard's announcements are POST /api/publish, logged with
        the key's id (never the key)."""
        status, _, _ = yield api_request(
            self.port, "publish", KEY, "POST", json.dumps({"text": "hello", "room": "ops"}).encode()
        )
        self.assertEqual(status, 202)
        [published] = [e for e in self.logged if "published" in e.get("log_format", "")]
        self.assertEqual((published["key"], published["room"]), (key_id(KEY), "ops"))
        self.assertEqual(published["log_level"], LogLevel.info)


class DashboardNodesTests(RedisTestCase):
    @inlineCallbacks
    def test_every_node(self):
        """With --redis, /admin/nodes on one node lists both, each with its
        clients and heartbeat, and Redis as this node sees it."""
        keys = ["--api-key-file", key_file(self)]
        alpha, port_a = yield start_node(self, self.redis, "alpha", *keys)
        beta, port_b = yield start_node(self, self.redis, "beta", *keys)
        yield connect_client(self, port_b, json_mode=True)
        yield wait_for(lambda: len(alpha.hub.presence("lobby")) == 1, what="beta's client on alpha")
        response, body = yield get(port_a, "/admin/nodes", KEY)
        answer = json.loads(body)
        self.assertEqual(answer["node"], "alpha")
        self.assertEqual(
            (answer["backplane"]["kind"], answer["backplane"]["connected"], answer["backplane"]["nodes"]),
            ("redis", True, 2),
        )
        self.assertEqual(
            [(n["node"], n["connections"], n["here"]) for n in answer["nodes"]],
            [("alpha", 0, True), ("beta", 1, False)],
        )
        self.assertTrue(all(n["heartbeat_age"] is not None for n in answer["nodes"]))
